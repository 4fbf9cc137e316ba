/* log.h - leveled logging to stderr, as text or JSON lines (one object per line).
 * Thread-safe (one fprintf per line). */
#ifndef CVLM_SERVER_LOG_H
#define CVLM_SERVER_LOG_H

enum cvlm_log_level { CVLM_LOG_DEBUG, CVLM_LOG_INFO, CVLM_LOG_WARN, CVLM_LOG_ERROR };

/* Returns -1 for an unknown level or format name. */
int cvlm_log_setup(const char *level, const char *format);
void cvlm_log(enum cvlm_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_DEBUG(...) cvlm_log(CVLM_LOG_DEBUG, __VA_ARGS__)
#define LOG_INFO(...) cvlm_log(CVLM_LOG_INFO, __VA_ARGS__)
#define LOG_WARN(...) cvlm_log(CVLM_LOG_WARN, __VA_ARGS__)
#define LOG_ERROR(...) cvlm_log(CVLM_LOG_ERROR, __VA_ARGS__)

/* Checked calls of the loop's libraries (architecture: every call that can fail is
 * checked, with file:line): a failure is logged as `file:line: call: reason` and the macro
 * evaluates to nonzero, so that `if (UV_CHECK(uv_timer_init(...))) return -1;` reads as
 * what it does. UV_CHECK takes a libuv return code (< 0 is an error), MHD_CHECK an
 * MHD_Result (MHD_NO is an error). */
#define UV_CHECK(call) cvlm_log_uv_failed((call), #call, __FILE__, __LINE__)
#define MHD_CHECK(call) cvlm_log_call_failed((call) != MHD_YES, #call, __FILE__, __LINE__)
int cvlm_log_uv_failed(int rc, const char *call, const char *file, int line);
int cvlm_log_call_failed(int failed, const char *call, const char *file, int line);

#endif
