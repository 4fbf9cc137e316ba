/* daemon.c - systemd notifications over $NOTIFY_SOCKET and the watchdog (see daemon.h).
 *
 * The protocol (sd_notify(3)): a single AF_UNIX SOCK_DGRAM datagram per notification, sent
 * to the path in $NOTIFY_SOCKET; a leading '@' means the Linux abstract namespace (the '@'
 * becomes a NUL byte and the address length covers exactly the name). systemd reads the
 * sender's credentials from the kernel to attribute the message to the main PID.
 */
#include "server/daemon.h"

#include "server/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int cvlm_notify(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path || !msg)
        return 0;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (path[0] != '/' && path[0] != '@')
        return -1; /* "vsock:..." and relative paths are not supported */
    if (n > sizeof(sa.sun_path) - (path[0] == '/')) /* a path needs its NUL */
        return -1;
    memcpy(sa.sun_path, path, n);
    if (path[0] == '@')
        sa.sun_path[0] = 0;
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '/'));
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    ssize_t r;
    size_t mlen = strlen(msg);
    do
        r = sendto(fd, msg, mlen, MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
    while (r < 0 && errno == EINTR);
    int err = errno;
    close(fd);
    if (r != (ssize_t)mlen) {
        LOG_DEBUG("notify %s: %s", path, r < 0 ? strerror(err) : "short send");
        return -1;
    }
    return 1;
}

int cvlm_notifyf(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    return cvlm_notify(msg);
}

/* A decimal unsigned integer filling the whole string, > 0; else 0. */
static uint64_t parse_u64(const char *s)
{
    if (!s || *s < '0' || *s > '9')
        return 0;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return 0;
    return (uint64_t)v;
}

uint64_t cvlm_watchdog_usec(void)
{
    uint64_t usec = parse_u64(getenv("WATCHDOG_USEC"));
    if (!usec)
        return 0;
    const char *pid = getenv("WATCHDOG_PID");
    if (pid && *pid && parse_u64(pid) != (uint64_t)getpid())
        return 0; /* meant for another process (e.g. our parent) */
    return usec;
}

static uv_timer_t wd_timer;
static int wd_active;

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    cvlm_notify("WATCHDOG=1");
}

uint64_t cvlm_watchdog_start(uv_loop_t *loop)
{
    uint64_t usec = cvlm_watchdog_usec();
    if (!usec || wd_active || !getenv("NOTIFY_SOCKET"))
        return 0;
    uint64_t ms = usec / 2000; /* half the interval */
    if (ms < 1)
        ms = 1;
    if (UV_CHECK(uv_timer_init(loop, &wd_timer)) ||
        UV_CHECK(uv_timer_start(&wd_timer, on_watchdog, 0, ms))) /* a first ping at once */
        return 0;
    uv_unref((uv_handle_t *)&wd_timer);
    wd_active = 1;
    LOG_INFO("systemd watchdog: %.3f s, keep-alive every %.3f s", usec / 1e6, ms / 1e3);
    return usec;
}

void cvlm_watchdog_stop(void)
{
    if (!wd_active)
        return;
    uv_timer_stop(&wd_timer);
    uv_close((uv_handle_t *)&wd_timer, NULL);
    wd_active = 0;
}
