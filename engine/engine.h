/* engine.h - the inference engine as the server sees it: the only engine header that
 * server/ includes.
 *
 * Threads: cvlm_engine_create() loads the model and starts the engine thread, which owns
 * the scheduler, the KV cache and the model and steps continuously (iteration-level
 * batching). Any thread may prepare a request (cvlm_request_create: image decoding,
 * tokenization, validation; heavy, meant for a work pool), submit it, cancel it, and take
 * its output. The engine never blocks a caller on model work: submit/cancel/take only
 * touch short critical sections. New output is announced by calling the request's wake
 * hook from the engine thread (the server points it at uv_async_send); the owner then
 * calls cvlm_request_take() to move the pending text/tokens out.
 *
 * Ownership: requests are refcounted. create returns one reference (the caller's);
 * submit takes another for the engine, dropped when the request finishes.
 */
#ifndef CVLM_ENGINE_H
#define CVLM_ENGINE_H

#include "engine/error.h"
#include "engine/grammar/grammar.h"
#include "engine/sched/sampler.h"

#include <stddef.h>
#include <stdint.h>

struct cvlm_engine;
struct cvlm_request;

/* Largest KV block: any size works in the kernels, but a block is the prefix cache's
 * unit of reuse (bigger blocks reuse less) and its bytes grow with the model (a 17B
 * CogVLM needs 512 KiB of BF16 K+V per slot of a block). */
#define CVLM_MAX_BLOCK_SIZE 1024

struct cvlm_engine_opts {
    const char *model_dir;
    const char *tokenizer;     /* NULL: model_dir/tokenizer.model */
    int threads;               /* CPU threads over all ranks; 0: one per core */
    int backend;               /* enum cvlm_backend_kind (engine/model/model.h): 0 CPU, 1 CUDA */
    int tp;                    /* tensor-parallel ranks; 0: 1 */
    int device;                /* CUDA: first device */
    int dummy_weights;         /* random weights of model_dir/config.json (benchmarks) */
    int quantize;              /* decoder linear weights at load: 0 none, 1 int8, 2 int4 */
    int quantize_vision;       /* with quantize: the vision tower and adapter too */
    int lm_head_16bit;         /* with quantize: lm_head stays 16-bit (default: int8) */
    size_t kv_bytes;           /* KV cache memory per rank; 0: 256 MiB */
    int kv_cache_dtype;        /* KV cache elements: 0 the backend's (CPU F32, CUDA BF16),
                                * 1 f32, 2 f16, 3 bf16, 4 int8 (CPU only; a 16-bit cache
                                * holds twice the blocks in kv_bytes, int8 ~3.9x);
                                * enum cvlm_kv_cache_dtype */
    int block_size;            /* KV slots per block, 1..CVLM_MAX_BLOCK_SIZE; 0: 16 */
    int max_batched_tokens;    /* tokens per step; 0: 512 */
    int max_seqs;              /* running sequences; 0: 64 */
    int queue_limit;           /* waiting requests before CVLM_EBUSY; 0: 256 */
    size_t vision_cache_bytes; /* 0: none */
    int no_prefix_cache;
    uint64_t max_image_pixels; /* 0: 50 megapixels */
    int max_context;           /* slots per sequence; 0: the config's max_position_embeddings */
    int max_images_per_step;   /* vision-tower runs per step while the batch waits (the
                                * costliest phase for the 17B/19B towers); 0: 1; < 0: no
                                * limit. Cached images do not count. */
};

struct cvlm_engine_info {
    const char *model_dir;
    int vocab_size, context_length, image_tokens, has_vision, eos_id, bos_id;
    int kv_blocks, block_size;
};

int cvlm_engine_create(const struct cvlm_engine_opts *opts, struct cvlm_engine **out);
/* Stops the engine thread; requests still running are finished as cancelled. */
void cvlm_engine_destroy(struct cvlm_engine *e);
void cvlm_engine_get_info(const struct cvlm_engine *e, struct cvlm_engine_info *info);

/* ---- requests ---------------------------------------------------------------------- */

/* One past exchange of a chat (the template renders it). */
struct cvlm_chat_turn {
    const char *user, *assistant;
};

enum cvlm_finish {
    CVLM_FINISH_NONE = 0,
    CVLM_FINISH_STOP,   /* EOS, a stop string or a stop token */
    CVLM_FINISH_LENGTH, /* max_tokens or the context length */
    CVLM_FINISH_CANCELLED,
    CVLM_FINISH_ERROR,
};

#define CVLM_MAX_TOP_LOGPROBS 20

struct cvlm_request_params {
    /* chat: history + the final user text, rendered by the model's template; completion
     * (raw = 1): `prompt` verbatim after BOS */
    int raw;
    const char *prompt;
    const struct cvlm_chat_turn *history;
    int n_history;
    const char *template_name; /* NULL: the model's; "base" | "chat" | "vqa" */
    const void *image;         /* encoded image bytes (JPEG/PNG/WebP/GIF) or NULL */
    size_t image_len;
    struct cvlm_sampling sampling;
    int max_tokens;          /* 0: up to the context length */
    const char *const *stop; /* stop strings, matched on the output text */
    int n_stop;
    const int32_t *stop_ids;
    int n_stop_ids;
    int ignore_eos;
    int logprobs; /* -1: none; else top alternatives per token (0..20) */
    /* OpenAI logit_bias: up to CVLM_MAX_LOGIT_BIAS entries (copied; ids in [0, vocab_size),
     * biases in [-100, 100], an id listed twice adds up). Each bias is added to the raw
     * logit before penalties, temperature and the filters, so it steers greedy decoding
     * too (-100 in effect bans a token, +100 forces it). Reported logprobs stay those of
     * the model's raw distribution, without the bias. */
    const struct cvlm_logit_bias *logit_bias;
    int n_logit_bias;
    /* OpenAI response_format (enum cvlm_rformat): TEXT (no constraint), JSON_OBJECT, or
     * JSON_SCHEMA with the schema's JSON text (json_schema_len bytes, copied). Decoding is
     * constrained so that the output is a document of the format whenever it ends by EOS
     * (engine/grammar/grammar.h; a stop string or max_tokens can still cut it short). A
     * schema outside the supported subset is CVLM_EINVAL naming the keyword. */
    int response_format;
    const char *json_schema;
    size_t json_schema_len;
};

/* Prepares a request; thread-safe. Errors: CVLM_EINVAL (bad parameters), image errors
 * (CVLM_EFORMAT / CVLM_EUNSUPPORTED / CVLM_ETOOBIG), CVLM_ETOOBIG for a prompt that with
 * max_tokens exceeds the context; the detail is in cvlm_last_error(). */
int cvlm_request_create(struct cvlm_engine *e, const struct cvlm_request_params *p,
                        struct cvlm_request **out);
void cvlm_request_ref(struct cvlm_request *r);
void cvlm_request_unref(struct cvlm_request *r);
int cvlm_request_prompt_tokens(const struct cvlm_request *r);
/* The request's image as the client sent it: its width and height in pixels as decoded
 * (before the resize to the model's input size; no EXIF rotation), 0 x 0 without one. */
void cvlm_request_image_size(const struct cvlm_request *r, int *width, int *height);

/* Queues the request. `wake(ctx)` is called from the engine thread whenever new output
 * (or the end) is available; it runs under the request's lock, so it must not call back
 * into the request (uv_async_send or signalling a condition variable is what it is
 * for), and once cvlm_request_take() has returned the finish it is never called again.
 * CVLM_EBUSY if the queue is full, CVLM_ESTATE if draining. */
int cvlm_engine_submit(struct cvlm_engine *e, struct cvlm_request *r, void (*wake)(void *ctx),
                       void *ctx);
/* Queues the n choices of one client request at once: all of them or none. The queue
 * limit is checked once for the group (sequences waiting < queue_limit), so a request
 * whose n exceeds the limit is accepted by an idle server. */
int cvlm_engine_submit_group(struct cvlm_engine *e, struct cvlm_request *const *rs, int n,
                             void (*wake)(void *ctx), void *ctx);
/* Cancels at any state; takes effect at the next step (the request then finishes with
 * CVLM_FINISH_CANCELLED). Safe to call more than once or after the end. */
void cvlm_engine_cancel(struct cvlm_engine *e, struct cvlm_request *r);

struct cvlm_token_out {
    int32_t id;
    /* Leading bytes of cvlm_engine_token_text(id) that are not in the output text: 1
     * when the detokenizer dropped the word-boundary space of a chat answer's first word,
     * else 0. The token texts from byte lead_strip on concatenate to the output text
     * (stop strings and byte-fallback pieces aside: token_text gives a byte piece as its
     * raw byte, the text only whole UTF-8 sequences, or U+FFFD). */
    int8_t lead_strip;
    float logprob;
    int n_top;
    int32_t top_id[CVLM_MAX_TOP_LOGPROBS];
    float top_logprob[CVLM_MAX_TOP_LOGPROBS];
};

struct cvlm_output {
    char *text; /* new output text, whole UTF-8 (malloc'd, may be NULL) */
    size_t text_len;
    struct cvlm_token_out *tokens; /* new tokens (malloc'd), if logprobs were asked */
    int n_tokens;
    enum cvlm_finish finish; /* set once, on the last take */
    char error[256];         /* CVLM_FINISH_ERROR: what went wrong */
    int prompt_tokens, completion_tokens;
    /* timings (ms), final on the last take: queue wait, vision tower, time to first
     * token from submit, end-to-end */
    double queue_ms, vision_ms, ttft_ms, e2e_ms;
};

/* Moves pending output into *out (zeroed first). Returns 1 if anything new (text,
 * tokens or the end), 0 if nothing. Free with cvlm_output_free. */
int cvlm_request_take(struct cvlm_request *r, struct cvlm_output *out);
/* 1 if take() would return something (without taking it). */
int cvlm_request_pending(struct cvlm_request *r);
void cvlm_output_free(struct cvlm_output *out);

/* The text of one token as the detokenizer writes it mid-text (for logprobs): U+2581 as
 * ' ', a byte piece as its raw byte, "" for BOS/EOS and other control pieces, the
 * unknown surface for <unk>; returns the byte length written (no NUL), truncated to cap.
 * A chat answer's first token may have its leading space left out of the text: see
 * cvlm_token_out.lead_strip. */
size_t cvlm_engine_token_text(const struct cvlm_engine *e, int32_t id, char *buf, size_t cap);

/* ---- operation --------------------------------------------------------------------- */

struct cvlm_engine_stats {
    int running, waiting;
    int kv_blocks, kv_used, kv_cached;
    uint64_t prefix_hit_tokens, prefix_query_tokens;
    uint64_t vision_hits, vision_misses;
    uint64_t preemptions;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t requests_submitted, requests_finished, requests_cancelled, requests_failed;
    uint64_t steps;
    /* the step's phases (engine/sched/sched.c): milliseconds spent in each, in all */
    double plan_ms, encode_ms, forward_ms, sample_ms;
    uint64_t images_encoded;  /* vision-tower runs */
    uint64_t images_deferred; /* prefill chunks held back by the per-step image budget */
};

void cvlm_engine_get_stats(struct cvlm_engine *e, struct cvlm_engine_stats *s);

/* Stops admitting (submit returns CVLM_ESTATE); running and queued requests go on. */
void cvlm_engine_drain(struct cvlm_engine *e);
/* Requests queued or running. */
int cvlm_engine_pending(struct cvlm_engine *e);

#endif
