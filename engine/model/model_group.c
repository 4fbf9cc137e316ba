/* model_group.c - struct cvlm_model: the tensor-parallel group that runs model_rank.c's ranks.
 *
 * Creation: one backend per rank (CPU: the threads split between the ranks; CUDA:
 * device + r; wrapped in the op table's entry checks when they are enabled, see
 * backend_check.h), the weight shard of each rank (weights_shard.c), the group's comm (in-
 * process CPU ranks or NCCL; a no-op for tp == 1) and the ranks themselves.
 *
 * Execution: tp == 1 runs rank 0 directly on the caller's thread. With tp > 1, ranks
 * 1..tp-1 each have a worker thread; a call publishes one job (the same batch plan for
 * every rank: "the scheduler's batch plan broadcast to all ranks"), runs rank 0 itself
 * and waits until every worker has finished the job. Inputs are checked once, before any
 * rank starts, because a rank that stopped early would leave the others waiting forever
 * in an all-reduce.
 */
#include "engine/model/model_rank.h"

#include "engine/error.h"
#include "engine/model/backend_check.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum job_kind { JOB_NONE, JOB_FORWARD, JOB_ENCODE, JOB_EXIT };

struct job {
    enum job_kind kind;
    const struct cvlm_batch *batch;
    const float *pixels;
    struct cvlm_feats *feats;
};

struct cvlm_model {
    struct cvlm_weights *w;
    int tp;
    struct cvlm_backend *be[CVLM_MAX_TP]; /* each rank's; the checked one when checks are on */
    struct cvlm_weights *shard[CVLM_MAX_TP];
    struct cvlm_comm *comm[CVLM_MAX_TP];
    struct cvlm_rank *rank[CVLM_MAX_TP];
    size_t kv_block_bytes;
    enum cvlm_dtype kv_dtype;
    /* workers (tp > 1) */
    pthread_t thread[CVLM_MAX_TP];
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    struct job job;
    unsigned long gen; /* bumped per published job */
    int pending;       /* workers still on the current job */
};

struct worker_arg {
    struct cvlm_model *m;
    int r;
};

static void run_job(struct cvlm_model *m, int r, const struct job *j)
{
    if (j->kind == JOB_FORWARD)
        cvlm_rank_forward(m->rank[r], j->batch, NULL);
    else if (j->kind == JOB_ENCODE)
        cvlm_rank_encode_image(m->rank[r], j->pixels, j->feats, NULL);
}

static void *worker_main(void *arg)
{
    struct worker_arg *wa = arg;
    struct cvlm_model *m = wa->m;
    int r = wa->r;
    unsigned long seen = 0;
    free(wa);
    for (;;) {
        pthread_mutex_lock(&m->mu);
        while (m->gen == seen)
            pthread_cond_wait(&m->go, &m->mu);
        seen = m->gen;
        struct job j = m->job;
        pthread_mutex_unlock(&m->mu);
        if (j.kind == JOB_EXIT)
            return NULL;
        run_job(m, r, &j);
        pthread_mutex_lock(&m->mu);
        if (--m->pending == 0)
            pthread_cond_signal(&m->done);
        pthread_mutex_unlock(&m->mu);
    }
}

/* Starts j on ranks 1..tp-1; rank 0's part is the caller's. */
static void publish(struct cvlm_model *m, const struct job *j)
{
    pthread_mutex_lock(&m->mu);
    m->job = *j;
    m->pending = m->n_threads;
    m->gen++;
    pthread_cond_broadcast(&m->go);
    pthread_mutex_unlock(&m->mu);
}

static void wait_workers(struct cvlm_model *m)
{
    pthread_mutex_lock(&m->mu);
    while (m->pending)
        pthread_cond_wait(&m->done, &m->mu);
    pthread_mutex_unlock(&m->mu);
}

/* ---- creation ------------------------------------------------------------------------ */

static int create_backends(struct cvlm_model *m, const struct cvlm_model_opts *o)
{
    int threads = o->threads > 0 ? o->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    struct cvlm_backend *real[CVLM_MAX_TP];
    for (int r = 0; r < m->tp; r++) {
        if (o->backend == CVLM_BACKEND_CUDA)
            m->be[r] = cvlm_backend_cuda_create(o->device + r);
        else /* the threads split between the ranks, at least one each */
            m->be[r] = cvlm_backend_cpu_create(threads / m->tp > 0 ? threads / m->tp : 1);
        if (!m->be[r] && o->backend == CVLM_BACKEND_CUDA) {
            char why[256]; /* the message is formatted into the buffer it comes from */
            snprintf(why, sizeof(why), "%s", cvlm_last_error());
            return cvlm_errf(CVLM_EINVAL, "CUDA device %d: %s", o->device + r, why);
        }
        if (!m->be[r])
            return cvlm_errf(CVLM_ENOMEM, "cannot create the CPU backend");
        real[r] = m->be[r];
        /* debug and sanitized builds: every op call of this rank goes through the entry
         * checks (backend_check.h); the model never sees the difference */
        if (cvlm_backend_check_enabled()) {
            if (!(m->be[r] = cvlm_backend_check_wrap(real[r]))) {
                real[r]->ops->destroy(real[r]);
                return cvlm_errf(CVLM_ENOMEM, "out of memory");
            }
        }
    }
    /* the collectives reach into the real backends (NCCL: the CUDA device and stream) */
    return m->tp > 1 && o->backend == CVLM_BACKEND_CUDA
               ? cvlm_comm_nccl_group_create(real, m->tp, m->comm)
               : cvlm_comm_cpu_group_create(real, m->tp, m->comm);
}

static int start_workers(struct cvlm_model *m)
{
    for (int r = 1; r < m->tp; r++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (!wa)
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        *wa = (struct worker_arg){m, r};
        if (pthread_create(&m->thread[r], NULL, worker_main, wa)) {
            free(wa);
            return cvlm_errf(CVLM_ENOMEM, "cannot start the rank %d thread", r);
        }
        m->n_threads++;
    }
    return 0;
}

/* Resolves the KV cache dtype (ro gets the explicit choice, which the ranks allocate) and
 * sizes the cache from a byte budget per rank: a 16-bit cache holds twice the blocks, an
 * int8 one ~4x (its scales counted: 4 bytes per slot, KV head and K / V). */
static int kv_opts(struct cvlm_model *m, const struct cvlm_model_opts *o,
                   struct cvlm_model_opts *ro)
{
    const struct cvlm_config *c = &m->w->cfg;
    int cuda = o->backend == CVLM_BACKEND_CUDA, kd = o->kv_cache_dtype;
    size_t bs = (size_t)(o->block_size > 0 ? o->block_size : 16);
    *ro = *o;
    if (kd < CVLM_KV_DEFAULT || kd > CVLM_KV_INT8)
        return cvlm_errf(CVLM_EINVAL, "kv_cache_dtype %d: 0 default, 1 f32, 2 f16, 3 bf16, 4 int8",
                         kd);
    if (kd == CVLM_KV_DEFAULT)
        kd = cuda ? CVLM_KV_BF16 : CVLM_KV_CPU_DEFAULT;
    if (cuda && kd != CVLM_KV_BF16)
        return cvlm_errf(CVLM_EINVAL,
                         "the CUDA backend's KV cache is BF16 only (kv_cache_dtype "
                         "%s refused)",
                         kd == CVLM_KV_F32   ? "f32"
                         : kd == CVLM_KV_F16 ? "f16"
                                             : "int8");
    ro->kv_cache_dtype = kd;
    m->kv_dtype = cvlm_model_kv_dtype_of(kd);
    size_t es = cvlm_dtype_size(m->kv_dtype);
    /* a slot holds the rank's KV heads only (GQA: fewer than its query heads) */
    size_t kv_width = (size_t)(cvlm_config_kv_heads(c) * cvlm_config_head_dim(c) / m->tp);
    m->kv_block_bytes = 2 * (size_t)c->num_layers * bs * kv_width * es;
    if (kd == CVLM_KV_INT8) /* + the F32 scales: one per slot, KV head and K / V */
        m->kv_block_bytes +=
            2 * (size_t)c->num_layers * bs * (size_t)(cvlm_config_kv_heads(c) / m->tp) * 4;
    if (o->kv_blocks > 0 || !o->kv_bytes)
        return 0;
    size_t blocks = o->kv_bytes / m->kv_block_bytes;
    if (blocks < 1 || blocks > (1u << 30))
        return cvlm_errf(CVLM_EINVAL, "KV memory of %zu bytes holds %zu blocks of %zu bytes",
                         o->kv_bytes, blocks, m->kv_block_bytes);
    ro->kv_blocks = (int)blocks;
    return 0;
}

int cvlm_model_create(struct cvlm_weights *w, const struct cvlm_model_opts *opts,
                      struct cvlm_model **out)
{
    struct cvlm_model_opts o = opts ? *opts : (struct cvlm_model_opts){0}, ro;
    struct cvlm_model *m;
    int rc;
    *out = NULL;
    if (o.tp <= 0)
        o.tp = 1;
    if ((rc = cvlm_weights_check_tp(&w->cfg, o.tp)))
        return rc;
    if (!(m = calloc(1, sizeof(*m))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    m->w = w;
    m->tp = o.tp;
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->go, NULL);
    pthread_cond_init(&m->done, NULL);
    if ((rc = create_backends(m, &o)) || (rc = kv_opts(m, &o, &ro)))
        goto out_fail;
    for (int r = 0; r < m->tp; r++)
        if ((rc = cvlm_weights_shard(w, r, m->tp, &m->shard[r])) ||
            (rc = cvlm_rank_create(m->shard[r], m->be[r], m->comm[r], &ro, &m->rank[r])))
            goto out_fail;
    if ((rc = start_workers(m)))
        goto out_fail;
    *out = m;
    return 0;
out_fail:
    cvlm_model_destroy(m);
    return rc;
}

void cvlm_model_destroy(struct cvlm_model *m)
{
    if (!m)
        return;
    if (m->n_threads) {
        publish(m, &(struct job){.kind = JOB_EXIT});
        for (int r = 1; r <= m->n_threads; r++)
            pthread_join(m->thread[r], NULL);
    }
    for (int r = 0; r < m->tp; r++) {
        cvlm_rank_destroy(m->rank[r]);
        cvlm_weights_destroy(m->shard[r]);
        cvlm_comm_destroy(m->comm[r]);
        if (m->be[r])
            m->be[r]->ops->destroy(m->be[r]);
    }
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->go);
    pthread_cond_destroy(&m->done);
    free(m);
}

int cvlm_model_block_size(const struct cvlm_model *m)
{
    return cvlm_rank_block_size(m->rank[0]);
}
int cvlm_model_kv_blocks(const struct cvlm_model *m)
{
    return cvlm_rank_kv_blocks(m->rank[0]);
}
int cvlm_model_max_tokens(const struct cvlm_model *m)
{
    return cvlm_rank_max_tokens(m->rank[0]);
}
int cvlm_model_tp(const struct cvlm_model *m)
{
    return m->tp;
}
struct cvlm_backend *cvlm_model_backend(const struct cvlm_model *m)
{
    return m->be[0];
}
const struct cvlm_config *cvlm_model_config(const struct cvlm_model *m)
{
    return &m->w->cfg;
}
size_t cvlm_model_kv_block_bytes(const struct cvlm_model *m)
{
    return m->kv_block_bytes;
}
enum cvlm_dtype cvlm_model_kv_dtype(const struct cvlm_model *m)
{
    return m->kv_dtype;
}

/* ---- image features ------------------------------------------------------------------ */

size_t cvlm_model_feats_bytes(const struct cvlm_model *m)
{
    const struct cvlm_config *c = &m->w->cfg;
    return (size_t)cvlm_config_image_tokens(c) * (size_t)c->hidden_size *
           cvlm_dtype_size(m->be[0]->act_dtype);
}

struct cvlm_feats *cvlm_model_feats_alloc(struct cvlm_model *m)
{
    struct cvlm_feats *f = calloc(1, sizeof(*f));
    for (int r = 0; f && r < m->tp; r++)
        if (!(f->buf[r] = m->be[r]->ops->alloc(m->be[r], cvlm_model_feats_bytes(m)))) {
            cvlm_model_feats_free(m, f);
            return NULL;
        }
    return f;
}

void cvlm_model_feats_free(struct cvlm_model *m, struct cvlm_feats *f)
{
    for (int r = 0; f && r < m->tp; r++)
        if (f->buf[r])
            m->be[r]->ops->free(m->be[r], f->buf[r]);
    free(f);
}

void cvlm_model_feats_to_host(struct cvlm_model *m, const struct cvlm_feats *f, float *dst)
{
    const struct cvlm_config *c = &m->w->cfg;
    m->be[0]->ops->to_host(m->be[0], dst, f->buf[0],
                           (size_t)cvlm_config_image_tokens(c) * (size_t)c->hidden_size);
}

/* ---- calls --------------------------------------------------------------------------- */

/* The first error any rank recorded: its backend's (device backends: a failed launch;
 * the op checks: a violated contract) or a failed all-reduce. Every rank's record is read
 * (and cleared), whichever is reported. */
static int status(struct cvlm_model *m)
{
    int first = 0;
    for (int r = 0; r < m->tp; r++) {
        int rc = m->be[r]->ops->status ? m->be[r]->ops->status(m->be[r]) : 0;
        if (!rc)
            rc = cvlm_rank_comm_status(m->rank[r]);
        if (rc && !first)
            first = rc;
    }
    return first;
}

int cvlm_model_encode_image(struct cvlm_model *m, const float *pixels, struct cvlm_feats *f,
                            float *vit_out)
{
    if (!m->w->cfg.has_vision)
        return cvlm_errf(CVLM_EINVAL, "this model has no vision tower");
    if (m->n_threads)
        publish(m, &(struct job){.kind = JOB_ENCODE, .pixels = pixels, .feats = f});
    cvlm_rank_encode_image(m->rank[0], pixels, f, vit_out);
    if (m->n_threads)
        wait_workers(m);
    return status(m);
}

int cvlm_model_forward(struct cvlm_model *m, const struct cvlm_batch *b, float *logits)
{
    int rc = cvlm_rank_check_batch(m->rank[0], b);
    if (rc)
        return rc;
    if (m->n_threads)
        publish(m, &(struct job){.kind = JOB_FORWARD, .batch = b});
    cvlm_rank_forward(m->rank[0], b, logits);
    if (m->n_threads)
        wait_workers(m);
    return status(m);
}
