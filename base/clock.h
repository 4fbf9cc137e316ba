/* clock.h - the one clock of the project: monotonic milliseconds, for timings and deadlines. */
#ifndef CVLM_CLOCK_H
#define CVLM_CLOCK_H

/* Milliseconds of CLOCK_MONOTONIC (never jumps with the wall clock). */
double cvlm_now_ms(void);

#endif
