/* sched.h - the scheduler: one engine step at a time over the state in
 * engine/engine_private.h (engine thread only). */
#ifndef CVLM_SCHED_H
#define CVLM_SCHED_H

#include "engine/engine_private.h"

/* One scheduler iteration: cancellations, batch planning (decodes, prefill chunks,
 * admissions), the forward pass, sampling and output. Returns 1 if it did work, 0 if
 * idle, negative on a model error (the affected requests are failed). */
int cvlm_sched_step(struct cvlm_engine *e);
/* Appends to the waiting queue (front = preempted requests). */
void cvlm_sched_enqueue(struct cvlm_engine *e, struct cvlm_request *r, int front);
/* Finishes every request (engine shutdown). */
void cvlm_sched_abort_all(struct cvlm_engine *e);

#endif
