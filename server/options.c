/* options.c - option table and its parsers (see options.h). */
#include "server/options.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define O(field) offsetof(struct cvlm_server_options, field)

const struct cvlm_option cvlm_options[] = {
    {"host", OPT_STR, O(host), "127.0.0.1", "", "Address to listen on; 0.0.0.0 for all interfaces.",
     0, 0},
    {"port", OPT_INT, O(port), "8000", "", "TCP port to listen on; 0 picks a free one.", 0, 65535},
    {"model", OPT_STR, O(model), "models/cogvlm-tiny-shapes", "",
     "Checkpoint directory (config.json + safetensors + tokenizer.model).", 0, 0},
    {"tokenizer", OPT_STR, O(tokenizer), "", "",
     "SentencePiece tokenizer.model; empty means MODEL/tokenizer.model.", 0, 0},
    {"served_model_name", OPT_STR, O(served_model_name), "", "",
     "Model id clients must send; empty means the model directory's name.", 0, 0},
    {"backend", OPT_STR, O(backend), "cpu", "",
     "cpu or cuda (a build with `make cuda`); cuda runs BF16 activations on the GPU(s).", 0, 0},
    {"tp", OPT_INT, O(tp), "1", "ranks",
     "Tensor-parallel ranks: GPUs device..device+tp-1 (cuda) or in-process CPU ranks; must "
     "divide the model's heads and MLP widths.",
     1, 8},
    {"device", OPT_INT, O(device), "0", "", "First CUDA device (rank r uses device + r).", 0, 1023},
    {"dummy_weights", OPT_BOOL, O(dummy_weights), "false", "",
     "Serve random weights of MODEL/config.json instead of its safetensors (benchmarks "
     "only: the answers are noise).",
     0, 0},
    {"quantize", OPT_STR, O(quantize), "none", "",
     "Weights of the decoder's linear layers at load: none, int8 (per output channel) or int4 "
     "(groups of 128). A GPTQ checkpoint (quantization_config in config.json) is loaded int4 "
     "as it is and needs none (int8/int4 are refused: docs/MODEL.md).",
     0, 0},
    {"quantize_vision", OPT_BOOL, O(quantize_vision), "false", "",
     "With quantize: the vision tower's linear layers and the adapter too.", 0, 0},
    {"quantize_lm_head", OPT_BOOL, O(quantize_lm_head), "true", "",
     "With quantize (int8 or int4): lm_head as int8 per output channel (false: 16-bit). "
     "Measured harmless (docs/PERFORMANCE.md); it is the largest matrix a decode step reads.",
     0, 0},
    {"threads", OPT_INT, O(threads), "0", "",
     "CPU threads for the model (split between the ranks); 0 = one per core.", 0, 4096},
    {"kv_memory", OPT_BYTES, O(kv_memory), "256M", "bytes",
     "Memory for the paged KV cache on each rank; bounds concurrent context (more = more "
     "sequences; each rank holds its share of the heads, so tp ranks hold tp times the tokens).",
     0, 1ull << 44},
    {"kv_cache_dtype", OPT_STR, O(kv_cache_dtype), "auto", "",
     "KV cache elements: auto (the backend's: f32 on cpu, bf16 on cuda), f32, f16, bf16 or "
     "int8. f16 / bf16 (cpu) hold twice the tokens in kv_memory and halve the cache's reads at "
     "long context, rounding keys and values once (nearest even); int8 (cpu) holds ~3.9x the "
     "f32 tokens (one f32 scale per token and head for keys and for values); cuda has bf16 "
     "only.",
     0, 0},
    {"block_size", OPT_INT, O(block_size), "16", "tokens",
     "KV cache block size (the engine's CVLM_MAX_BLOCK_SIZE bounds it).", 1, 1024},
    {"max_batched_tokens", OPT_INT, O(max_batched_tokens), "512", "tokens",
     "Tokens per engine step; larger prefill chunks, longer pauses for running decodes.", 1,
     1 << 20},
    {"max_seqs", OPT_INT, O(max_seqs), "64", "", "Sequences running at once.", 1, 1 << 16},
    {"queue_limit", OPT_INT, O(queue_limit), "256", "",
     "Sequences waiting for admission before new requests get 429; a request's n choices "
     "are queued together, accepted while fewer than this many wait.",
     1, 1 << 20},
    {"vision_cache_memory", OPT_BYTES, O(vision_cache_memory), "64M", "bytes",
     "Cache of vision-tower outputs by image content; 0 disables it.", 0, 1ull << 44},
    {"prefix_cache", OPT_BOOL, O(prefix_cache), "true", "",
     "Reuse the KV blocks of identical prompt prefixes (same image + text).", 0, 0},
    {"max_context", OPT_INT, O(max_context), "0", "tokens",
     "Slots per sequence (prompt + output); 0 = the model's max_position_embeddings.", 0, 1 << 24},
    {"max_images_per_step", OPT_INT, O(max_images_per_step), "1", "images",
     "Images the vision tower encodes in one engine step while the step's decodes wait "
     "(cached images do not count); 0 = no limit. Higher: faster image prefill in bursts, "
     "longer pauses for running streams.",
     0, 1024},
    {"max_n", OPT_INT, O(max_n), "4", "", "Largest `n` (choices per request) accepted.", 1, 128},
    {"max_body_bytes", OPT_BYTES, O(max_body_bytes), "20M", "bytes",
     "Largest request body; larger ones get 413 while still being received.", 1024, 1ull << 32},
    {"max_image_pixels", OPT_BYTES, O(max_image_pixels), "50M", "pixels",
     "Largest decoded image (width x height), checked before decoding pixels.", 1, 1ull << 32},
    {"allowed_media_domains", OPT_STR, O(allowed_media_domains), "", "",
     "Hosts whose http(s) image URLs the server fetches: comma-separated exact hosts and "
     "*.suffix patterns (subdomains only). Empty, with allow_any_media_domain false: image "
     "URLs must be data: URLs. Loopback, private, link-local, metadata and other non-public "
     "addresses are refused whatever the list says.",
     0, 0},
    {"allow_any_media_domain", OPT_BOOL, O(allow_any_media_domain), "false", "",
     "Fetch http(s) image URLs from any host (public addresses only, as above).", 0, 0},
    {"max_image_bytes", OPT_BYTES, O(max_image_bytes), "20M", "bytes",
     "Largest fetched image (http(s) image URLs): refused at a larger Content-Length, or cut "
     "as soon as more arrives.",
     1024, 1ull << 32},
    {"media_connect_timeout", OPT_INT, O(media_connect_timeout), "5", "seconds",
     "Time to connect to the host of an image URL.", 1, 600},
    {"media_timeout", OPT_INT, O(media_timeout), "15", "seconds",
     "Time to fetch an image URL, every redirect included.", 1, 3600},
    {"max_connections", OPT_INT, O(max_connections), "1024", "",
     "Concurrent HTTP connections; more are refused.", 1, 1 << 20},
    {"connection_timeout", OPT_INT, O(connection_timeout), "30", "seconds",
     "Idle time after which an HTTP connection is closed (slow or stuck clients).", 0, 86400},
    {"request_timeout", OPT_INT, O(request_timeout), "600", "seconds",
     "Longest a generation may run; it is then cancelled. 0 = no limit.", 0, 1 << 24},
    {"drain_timeout", OPT_INT, O(drain_timeout), "30", "seconds",
     "On SIGTERM/SIGINT, how long in-flight requests may finish before exit.", 0, 86400},
    {"api_key", OPT_STR, O(api_key), "", "", "If set, /v1/* requires `Authorization: Bearer KEY`.",
     0, 0},
    {"api_key_file", OPT_STR, O(api_key_file), "", "",
     "File whose first line is the API key (keeps it out of the process list).", 0, 0},
    {"log_level", OPT_STR, O(log_level), "info", "", "debug, info, warn or error.", 0, 0},
    {"log_format", OPT_STR, O(log_format), "text", "", "text or json (one object per line).", 0, 0},
    {"config", OPT_STR, O(config), "", "", "Config file to read (key = value lines).", 0, 0},
};
const int cvlm_n_options = (int)(sizeof(cvlm_options) / sizeof(cvlm_options[0]));

static const struct cvlm_option *find(const char *key, size_t n)
{
    for (int i = 0; i < cvlm_n_options; i++)
        if (strlen(cvlm_options[i].key) == n && !strncmp(cvlm_options[i].key, key, n))
            return &cvlm_options[i];
    return NULL;
}

/* "256M" -> bytes; K/M/G are binary (KiB...). */
static int parse_bytes(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *s == '-')
        return -1;
    int shift = 0;
    switch (toupper((unsigned char)*end)) {
    case 'K':
        shift = 10;
        end++;
        break;
    case 'M':
        shift = 20;
        end++;
        break;
    case 'G':
        shift = 30;
        end++;
        break;
    default: break;
    }
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end || (shift && v > (UINT64_MAX >> shift)))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

/* "port (--port)": how a message names an option, for the file and the command line. */
static const char *opt_name(const struct cvlm_option *o, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "%s (--%s)", o->key, o->key);
    for (int k = (int)strlen(o->key) + 4; k < n && k < (int)cap; k++)
        buf[k] = buf[k] == '_' ? '-' : buf[k];
    return buf;
}

/* "port (--port): 84245 is out of range: 0 to 65535" */
static int out_of_range(const struct cvlm_option *o, const char *v, char *err, size_t errlen)
{
    char name[160];
    snprintf(err, errlen, "%s: %s is out of range: %llu to %llu%s%s", opt_name(o, name, 160), v,
             (unsigned long long)o->lo, (unsigned long long)o->hi, *o->unit ? " " : "", o->unit);
    return -1;
}

static int set_value(struct cvlm_server_options *c, const struct cvlm_option *o, const char *v,
                     char *err, size_t errlen)
{
    char *p = (char *)c + o->offset, *end, name[160];
    long n;
    switch (o->type) {
    case OPT_STR: {
        char *dup = strdup(v);
        if (!dup)
            return snprintf(err, errlen, "out of memory"), -1;
        free(*(char **)p);
        *(char **)p = dup;
        return 0;
    }
    case OPT_INT:
        errno = 0;
        n = strtol(v, &end, 10);
        if (errno || end == v || *end || n < 0 || n > 1000000000)
            return snprintf(err, errlen, "%s: '%s' is not a non-negative integer",
                            opt_name(o, name, sizeof(name)), v),
                   -1;
        if ((uint64_t)n < o->lo || (uint64_t)n > o->hi)
            return out_of_range(o, v, err, errlen);
        *(int *)p = (int)n;
        return 0;
    case OPT_BYTES: {
        uint64_t b;
        if (parse_bytes(v, &b))
            return snprintf(err, errlen, "%s: '%s' is not a size (e.g. 512M)",
                            opt_name(o, name, sizeof(name)), v),
                   -1;
        if (b < o->lo || b > o->hi)
            return out_of_range(o, v, err, errlen);
        *(uint64_t *)p = b;
        return 0;
    }
    case OPT_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on"))
            *(int *)p = 1;
        else if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no") || !strcmp(v, "off"))
            *(int *)p = 0;
        else
            return snprintf(err, errlen, "%s: '%s' is not true/false",
                            opt_name(o, name, sizeof(name)), v),
                   -1;
        return 0;
    }
    return -1;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = 0;
    return s;
}

static int read_file(struct cvlm_server_options *c, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    int lineno = 0;
    if (!f)
        return snprintf(err, errlen, "config file %s: %s", path, strerror(errno)), -1;
    while (fgets(line, sizeof(line), f)) {
        char *s = trim(line), *eq = strchr(s, '=');
        const struct cvlm_option *o = NULL;
        lineno++;
        if (!*s || *s == '#')
            continue;
        if (eq) {
            *eq = 0;
            char *k = trim(s);
            o = find(k, strlen(k));
        }
        if (!eq || !o) {
            snprintf(err, errlen, "%s:%d: unknown or malformed line", path, lineno);
            fclose(f);
            return -1;
        }
        char *v = trim(eq + 1), *hash;
        if (*v != '"' && ((hash = strstr(v, " #")) || (hash = strstr(v, "\t#"))))
            *hash = 0; /* a trailing comment (unquoted values only) */
        v = trim(v);
        size_t vl = strlen(v);
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') { /* optional quotes */
            v[vl - 1] = 0;
            v++;
        }
        if (set_value(c, o, v, err, errlen)) {
            fclose(f);
            return -1;
        }
    }
    fclose(f);
    return 0;
}

static int read_env(struct cvlm_server_options *c, char *err, size_t errlen)
{
    char name[96];
    for (int i = 0; i < cvlm_n_options; i++) {
        const struct cvlm_option *o = &cvlm_options[i];
        int n = snprintf(name, sizeof(name), "COGVLM_%s", o->key);
        for (int k = 7; k < n; k++)
            name[k] = (char)toupper((unsigned char)name[k]);
        const char *v = getenv(name);
        if (v && set_value(c, o, v, err, errlen))
            return -1;
    }
    return 0;
}

/* --kv-memory 1G, --kv-memory=1G; booleans may omit the value (--prefix-cache). */
static int read_argv(struct cvlm_server_options *c, int argc, char **argv, int apply_config_only,
                     char *err, size_t errlen)
{
    char key[96];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (strncmp(a, "--", 2))
            return snprintf(err, errlen, "unexpected argument '%s'", a), -1;
        size_t n = strcspn(a + 2, "=");
        if (n >= sizeof(key))
            return snprintf(err, errlen, "unknown option '%s'", a), -1;
        for (size_t k = 0; k < n; k++)
            key[k] = a[2 + k] == '-' ? '_' : a[2 + k];
        key[n] = 0;
        const struct cvlm_option *o = find(key, n);
        if (!o)
            return snprintf(err, errlen, "unknown option '%s' (see --help)", a), -1;
        if (a[2 + n] == '=')
            v = a + 3 + n;
        else if (o->type == OPT_BOOL && (i + 1 >= argc || !strncmp(argv[i + 1], "--", 2)))
            v = "true";
        else if (i + 1 < argc)
            v = argv[++i];
        else
            return snprintf(err, errlen, "option '%s' needs a value", a), -1;
        if (apply_config_only != !strcmp(o->key, "config"))
            continue;
        if (set_value(c, o, v, err, errlen))
            return -1;
    }
    return 0;
}

void cvlm_options_print_help(FILE *f)
{
    fprintf(f, "usage: cogvlm-server [--option value ...]\n\n"
               "Every option is also a config-file key (key = value) and an environment\n"
               "variable COGVLM_KEY. Precedence: default < file < environment < command line.\n\n");
    for (int i = 0; i < cvlm_n_options; i++) {
        const struct cvlm_option *o = &cvlm_options[i];
        char flag[64];
        int n = snprintf(flag, sizeof(flag), "--%s", o->key);
        for (int k = 2; k < n; k++)
            flag[k] = flag[k] == '_' ? '-' : flag[k];
        fprintf(f, "  %-24s %s\n  %-24s default: %s%s%s", flag, o->help, "",
                *o->def ? o->def : "(empty)", *o->unit ? " " : "", o->unit);
        if (o->type == OPT_INT || o->type == OPT_BYTES)
            fprintf(f, "; range: %llu to %llu", (unsigned long long)o->lo,
                    (unsigned long long)o->hi);
        fputc('\n', f);
    }
}

int cvlm_options_parse(struct cvlm_server_options *c, int argc, char **argv, char *err,
                       size_t errlen)
{
    memset(c, 0, sizeof(*c));
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            cvlm_options_print_help(stdout);
            return 1;
        }
    for (int i = 0; i < cvlm_n_options; i++)
        if (set_value(c, &cvlm_options[i], cvlm_options[i].def, err, errlen))
            return -1;
    /* the config file is named by the environment or the command line, then read first */
    const char *env_cfg = getenv("COGVLM_CONFIG");
    if (env_cfg && set_value(c, find("config", 6), env_cfg, err, errlen))
        return -1;
    if (read_argv(c, argc, argv, 1, err, errlen))
        return -1;
    /* a private copy: the file may itself set `config` (which then has no effect) */
    char *path = *c->config ? strdup(c->config) : NULL;
    int rc = path ? read_file(c, path, err, errlen) : 0;
    free(path);
    if (rc)
        return -1;
    if (read_env(c, err, errlen) || read_argv(c, argc, argv, 0, err, errlen))
        return -1;
    return 0;
}

void cvlm_options_free(struct cvlm_server_options *c)
{
    for (int i = 0; i < cvlm_n_options; i++)
        if (cvlm_options[i].type == OPT_STR) {
            char **p = (char **)((char *)c + cvlm_options[i].offset);
            free(*p);
            *p = NULL;
        }
}
