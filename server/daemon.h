/* daemon.h - systemd service notifications (sd_notify protocol) without libsystemd.
 *
 * Under `Type=notify` systemd passes $NOTIFY_SOCKET, a unix datagram socket ("/path", or
 * "@name" for the abstract namespace); each notification is one datagram of
 * newline-separated KEY=VALUE lines: READY=1 once the model is loaded, STOPPING=1 when
 * draining starts, STATUS=... for `systemctl status`, WATCHDOG=1 as a keep-alive when
 * WatchdogSec= is set (systemd then passes $WATCHDOG_USEC and $WATCHDOG_PID).
 * Everything is a no-op when $NOTIFY_SOCKET is unset (not started by systemd).
 */
#ifndef CVLM_DAEMON_H
#define CVLM_DAEMON_H

#include <stdint.h>
#include <uv.h>

/* Sends msg as one datagram to $NOTIFY_SOCKET. Returns 1 when sent, 0 when there is no
 * socket to send to (unset or empty), -1 on error (bad address, send failed). */
int cvlm_notify(const char *msg);
/* printf-style cvlm_notify. */
int cvlm_notifyf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The watchdog interval systemd expects keep-alives within, in microseconds: $WATCHDOG_USEC
 * when set, a positive integer, and $WATCHDOG_PID is unset or this process; else 0
 * (disabled). Send WATCHDOG=1 at half of it. */
uint64_t cvlm_watchdog_usec(void);

/* When the watchdog is enabled, starts an unreferenced timer on loop that sends WATCHDOG=1
 * every half interval (from the loop thread, so a stuck loop stops the pings) and returns
 * the interval in microseconds; returns 0 and starts nothing otherwise.
 * cvlm_watchdog_stop() closes the timer (call it before the loop's final run). */
uint64_t cvlm_watchdog_start(uv_loop_t *loop);
void cvlm_watchdog_stop(void);

#endif
