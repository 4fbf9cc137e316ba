/* sched.h - the engine's internal state and the scheduler's step (internal to engine/).
 *
 * struct cvlm_engine is shared by engine.c (thread, submit/cancel, stats), request.c
 * (request preparation needs the config and tokenizer) and sched.c (the step). Fields
 * under "engine thread" are touched only by the engine thread; those under "mu" only
 * with the mutex held.
 */
#ifndef CVLM_SCHED_H
#define CVLM_SCHED_H

#include "engine/engine.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "engine/request.h"
#include "engine/tokenizer.h"
#include "engine/vcache.h"
#include "engine/weights.h"

#include <pthread.h>

struct cvlm_engine {
    struct cvlm_engine_opts opts; /* defaults filled in */
    char *model_dir;
    struct cvlm_weights *w;
    struct cvlm_model *model;
    struct cvlm_tokenizer *tok;
    int max_context;

    /* engine thread */
    struct cvlm_kvcache *kv;
    struct cvlm_vcache *vc;
    struct cvlm_request *wait_head, *wait_tail; /* FIFO; preempted requests go first */
    struct cvlm_request **running;              /* [max_seqs], admission order */
    int n_running;
    uint64_t admit_seq;
    struct cvlm_engine_stats st; /* published to `pub` under mu after each step */
    /* per-step scratch, sized for max_batched_tokens */
    int32_t *b_ids, *b_pos, *b_seq, *b_slot, *b_img;
    uint8_t *b_expert, *b_want;
    struct cvlm_seq_kv *b_seqs;
    const struct cvlm_feats **b_feats;
    struct cvlm_request **b_req; /* [max_seqs] sequence -> request */
    int *b_nfed;
    float *logits;               /* [max_seqs, vocab] */
    float *lp_scratch;           /* [vocab] */

    /* mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct cvlm_request *in_head, *in_tail; /* submitted, not yet taken by the thread */
    int n_in, n_waiting_pub;
    int stop, draining;
    struct cvlm_engine_stats pub;
    pthread_t thread;
    int thread_started;
};

/* One scheduler iteration: cancellations, batch planning (decodes, prefill chunks,
 * admissions), the forward pass, sampling and output. Returns 1 if it did work, 0 if
 * idle, negative on a model error (the affected requests are failed). */
int cvlm_sched_step(struct cvlm_engine *e);
/* Appends to the waiting queue (front = preempted requests). */
void cvlm_sched_enqueue(struct cvlm_engine *e, struct cvlm_request *r, int front);
/* Finishes every request (engine shutdown). */
void cvlm_sched_abort_all(struct cvlm_engine *e);

#endif
