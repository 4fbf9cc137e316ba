/* options.h - the server's options, from one declarative table.
 *
 * Every option has a key (config file `key = value`), a CLI flag (--key-with-dashes),
 * an environment variable (COGVLM_KEY) and a help line; `--help` and the documented
 * config/cogvlm.conf come from the same table. Precedence: default < file < env < CLI.
 * Unknown keys and malformed values are errors.
 */
#ifndef CVLM_SERVER_OPTIONS_H
#define CVLM_SERVER_OPTIONS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct cvlm_server_options {
    char *host;
    int port;
    char *model;
    char *tokenizer;
    char *served_model_name;
    char *backend;
    int tp;
    int device;
    int dummy_weights;
    char *quantize;
    int quantize_vision;
    int quantize_lm_head;
    int threads;
    uint64_t kv_memory;
    char *kv_cache_dtype; /* auto, f32, f16, bf16 or int8 */
    int block_size;
    int max_batched_tokens;
    int max_seqs;
    int queue_limit;
    uint64_t vision_cache_memory;
    int prefix_cache;
    int max_context;
    int max_images_per_step;
    int max_n;
    uint64_t max_body_bytes;
    uint64_t max_image_pixels;
    char *allowed_media_domains; /* http(s) image URLs: server/fetch.h */
    int allow_any_media_domain;
    uint64_t max_image_bytes;
    int media_connect_timeout;
    int media_timeout;
    int max_connections;
    int connection_timeout;
    int request_timeout;
    int drain_timeout;
    char *api_key;
    char *api_key_file;
    char *log_level;
    char *log_format;
    char *config;
};

enum cvlm_opt_type { OPT_STR, OPT_INT, OPT_BYTES, OPT_BOOL };

struct cvlm_option {
    const char *key;
    enum cvlm_opt_type type;
    size_t offset;
    const char *def;  /* default, as text */
    const char *unit; /* "" when none */
    const char *help; /* what it does and what a change means */
    /* OPT_INT / OPT_BYTES: the accepted range, checked at parse time (a value outside it
     * is an error naming the option, never silently wrapped or clamped) */
    uint64_t lo, hi;
};

extern const struct cvlm_option cvlm_options[];
extern const int cvlm_n_options;

/* Fills cfg from defaults, the config file (--config / COGVLM_CONFIG), the environment and
 * argv. Returns 0, 1 when --help was printed, or -1 with a message in err. */
int cvlm_options_parse(struct cvlm_server_options *cfg, int argc, char **argv, char *err,
                       size_t errlen);
void cvlm_options_free(struct cvlm_server_options *cfg);
void cvlm_options_print_help(FILE *f);

#endif
