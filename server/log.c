/* log.c - stderr logger (see log.h). JSON mode escapes the message as a JSON string. */
#include "server/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <uv.h>

static enum cvlm_log_level min_level = CVLM_LOG_INFO;
static int json_mode;
static const char *const names[] = {"debug", "info", "warn", "error"};

int cvlm_log_setup(const char *level, const char *format)
{
    int found = -1;
    for (int i = 0; i < 4; i++)
        if (level && !strcmp(level, names[i]))
            found = i;
    if (found < 0 || !format || (strcmp(format, "text") && strcmp(format, "json")))
        return -1;
    min_level = (enum cvlm_log_level)found;
    json_mode = !strcmp(format, "json");
    return 0;
}

/* Appends s to out as the body of a JSON string. */
static size_t json_escape(char *out, size_t cap, const char *s)
{
    size_t n = 0;
    for (; *s && n + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            n += (size_t)snprintf(out + n, cap - n, "\\%c", c);
        else if (c < 0x20)
            n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
        else
            out[n++] = (char)c;
    }
    out[n] = 0;
    return n;
}

void cvlm_log(enum cvlm_log_level lvl, const char *fmt, ...)
{
    char msg[2048], esc[4200], ts[40];
    struct timespec now;
    struct tm tm;
    va_list ap;
    if (lvl < min_level)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - n, ".%03ldZ", now.tv_nsec / 1000000);
    if (json_mode) {
        json_escape(esc, sizeof(esc), msg);
        fprintf(stderr, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"%s\"}\n", ts, names[lvl], esc);
    } else {
        fprintf(stderr, "%s %-5s %s\n", ts, names[lvl], msg);
    }
}

int cvlm_log_uv_failed(int rc, const char *call, const char *file, int line)
{
    if (rc >= 0)
        return 0;
    cvlm_log(CVLM_LOG_ERROR, "%s:%d: %s: %s", file, line, call, uv_strerror(rc));
    return 1;
}

int cvlm_log_call_failed(int failed, const char *call, const char *file, int line)
{
    if (failed)
        cvlm_log(CVLM_LOG_ERROR, "%s:%d: %s failed", file, line, call);
    return failed;
}
