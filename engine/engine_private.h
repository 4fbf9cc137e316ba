/* engine_private.h - the engine's internal state: struct cvlm_engine (private to
 * engine/; the server sees only the opaque pointer of engine.h).
 *
 * It is shared by engine.c (thread, submit/cancel, stats), sched/request.c (request
 * preparation needs the config and tokenizer) and sched/sched.c (the step). Fields under
 * "engine thread" are touched only by the engine thread; those under "mu" only with the
 * mutex held.
 */
#ifndef CVLM_ENGINE_PRIVATE_H
#define CVLM_ENGINE_PRIVATE_H

#include "engine/engine.h"
#include "engine/model/model.h"
#include "engine/model/weights.h"
#include "engine/sched/kvcache.h"
#include "engine/sched/request.h"
#include "engine/sched/vcache.h"
#include "engine/text/tokenizer.h"

#include <pthread.h>
#include <stdatomic.h>

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
    float *logits;                 /* [max_seqs, vocab] */
    float *lp_scratch;             /* [vocab] */
    struct cvlm_request **enc_req; /* [max_seqs] images to encode this step */
    struct cvlm_vocab *vocab;      /* token texts as a trie, for grammar masks (lazily) */

    /* compiled response_format grammars, shared by requests (thread-safe) */
    struct cvlm_grammar_table *grammars;

    /* mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct cvlm_request *in_head, *in_tail; /* submitted, not yet taken by the thread */
    int n_in, n_waiting_pub;
    /* requests in the engine thread's wait queue, kept exact at every enqueue and removal
     * (the engine thread writes it; submit reads it under mu for the queue limit, where a
     * count published once per step let submits pass a full queue or refused early) */
    atomic_int n_waiting;
    int stop, draining;
    struct cvlm_engine_stats pub;
    pthread_t thread;
    int thread_started;
};

#endif
