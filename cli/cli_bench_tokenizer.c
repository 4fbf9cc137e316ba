/* cli_bench_tokenizer.c - `cogvlm bench-tokenizer`: encoding throughput of the tokenizers.
 *
 *   cogvlm bench-tokenizer --tokenizer llama2-tokenizer.model --tokenizer tokenizer.json
 *
 * Encodes English text, on the calling thread only (one core), with each --tokenizer
 * (SentencePiece tokenizer.model or byte-level BPE tokenizer.json), in two ways:
 * - whole: the text in one cvlm_tokenizer_encode call;
 * - prompts: the text cut at line ends into pieces of at most --chunk bytes (4096), one
 *   call each, as a server encodes its requests (per-call costs included).
 * Each way is repeated for --seconds and reported as MB/s (10^6 bytes of input) and
 * tokens/s of this thread's CPU time (what a core gives when the machine is shared) and of
 * wall time. The text: --text FILE, or by default README.md and the docs/ folder's .md
 * files of the current directory (the repository's English prose and tables), repeated to
 * at least --size MB (1).
 */
#include "cli/cli.h"
#include "engine/error.h"
#include "engine/text/tokenizer.h"

#include <glob.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TOK 8

struct tb_opts {
    const char *tok[MAX_TOK], *text, *json;
    int n_tok;
    double seconds;
    size_t chunk, size; /* --chunk; --size: the text repeated to at least this many bytes */
};

struct tb_way {
    double cpu, wall; /* seconds per pass */
    size_t ids;       /* ids of one pass */
    int passes;
};

static void usage(FILE *f)
{
    fprintf(f, "usage: cogvlm bench-tokenizer --tokenizer PATH [--tokenizer PATH ...]\n"
               "                              [--text FILE] [--size 1] [--seconds 1]\n"
               "                              [--chunk 4096] [--json FILE]\n\n"
               "Single-threaded encoding throughput (MB/s of text, tokens/s) of each tokenizer\n"
               "(tokenizer.model: SentencePiece; tokenizer.json: byte-level BPE; or a model\n"
               "directory), on --text or, by default, README.md + docs/*.md of the current\n"
               "directory, repeated to --size MB (10^6 bytes): the whole text in one call, and in\n"
               "prompts of at most --chunk bytes cut at line ends; each repeated for --seconds.\n"
               "MB/s and tokens/s are of the thread's CPU time (wall time in parentheses).\n");
}

static int parse(int argc, char **argv, struct tb_opts *o)
{
    *o = (struct tb_opts){.seconds = 1.0, .chunk = 4096, .size = 1000000};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return 1;
        if (!v)
            return -1;
        i++;
        if (!strcmp(a, "--tokenizer") && o->n_tok < MAX_TOK)
            o->tok[o->n_tok++] = v;
        else if (!strcmp(a, "--text"))
            o->text = v;
        else if (!strcmp(a, "--json"))
            o->json = v;
        else if (!strcmp(a, "--seconds"))
            o->seconds = atof(v);
        else if (!strcmp(a, "--chunk"))
            o->chunk = (size_t)atol(v);
        else if (!strcmp(a, "--size"))
            o->size = (size_t)(atof(v) * 1e6);
        else
            return -1;
    }
    return o->n_tok < 1 || !(o->seconds > 0 && o->seconds <= 600) || o->chunk < 16 ||
                   o->size > ((size_t)1 << 30)
               ? -1
               : 0;
}

/* Appends the file at path to *buf (capacity *cap); 0 or CVLM_E*. */
static int append_file(const char *path, char **buf, size_t *len, size_t *cap)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return cvlm_errf(CVLM_ENOENT, "%s: cannot open", path);
    int rc = 0;
    for (;;) {
        if (*cap - *len < 65536) {
            char *nb = realloc(*buf, *cap * 2 + 65536);
            if (!nb) {
                rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
                break;
            }
            *buf = nb, *cap = *cap * 2 + 65536;
        }
        size_t n = fread(*buf + *len, 1, *cap - *len, f);
        *len += n;
        if (n == 0) {
            if (ferror(f))
                rc = cvlm_errf(CVLM_EIO, "%s: read error", path);
            break;
        }
    }
    fclose(f);
    return rc;
}

/* The benchmark's text: --text, or README.md + the docs/ .md files, repeated to >= 1 MB. */
static int load_text(const struct tb_opts *o, char **out, size_t *out_len)
{
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;
    if (o->text) {
        rc = append_file(o->text, &buf, &len, &cap);
    } else {
        glob_t g = {0};
        rc = append_file("README.md", &buf, &len, &cap);
        if (!rc && glob("docs/*.md", 0, NULL, &g) == 0)
            for (size_t i = 0; !rc && i < g.gl_pathc; i++)
                rc = append_file(g.gl_pathv[i], &buf, &len, &cap);
        globfree(&g);
        if (rc)
            cvlm_errf(CVLM_ENOENT, "no --text and no README.md / docs/*.md here (%s)",
                      cvlm_last_error());
    }
    if (!rc && len == 0)
        rc = cvlm_errf(CVLM_EINVAL, "the text is empty");
    size_t one = len;
    while (!rc && len < o->size) { /* repeat: the tokenizers keep no cache */
        if (len + one > cap) {
            char *nb = realloc(buf, (len + one) * 2);
            if (!nb) {
                rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
                break;
            }
            buf = nb, cap = (len + one) * 2;
        }
        memcpy(buf + len, buf, one);
        len += one;
    }
    if (rc) {
        free(buf);
        return rc;
    }
    *out = buf, *out_len = len;
    return 0;
}

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The end of the prompt that starts at text[at]: at most `chunk` bytes, after its last
 * '\n' when it has one, else at a UTF-8 character boundary. */
static size_t prompt_end(const char *text, size_t len, size_t at, size_t chunk)
{
    size_t end = len - at <= chunk ? len : at + chunk;
    if (end == len)
        return end;
    for (size_t k = end; k > at + chunk / 2; k--)
        if (text[k - 1] == '\n')
            return k;
    while (end > at + 1 && ((unsigned char)text[end] & 0xc0) == 0x80)
        end--;
    return end;
}

/* One pass over the text: whole (chunk 0) or in prompts; the ids it made. */
static int pass(const struct cvlm_tokenizer *t, const char *text, size_t len, size_t chunk,
                size_t *n_ids)
{
    *n_ids = 0;
    for (size_t at = 0; at < len;) {
        size_t end = chunk ? prompt_end(text, len, at, chunk) : len, n = 0;
        int32_t *ids = NULL;
        int rc = cvlm_tokenizer_encode(t, text + at, end - at, &ids, &n);
        free(ids);
        if (rc)
            return rc;
        *n_ids += n;
        at = end;
    }
    return 0;
}

static int measure(const struct cvlm_tokenizer *t, const char *text, size_t len, size_t chunk,
                   double seconds, struct tb_way *w)
{
    size_t n;
    int rc = pass(t, text, len, chunk, &n); /* warm-up: page faults, allocator */
    double c0 = clock_s(CLOCK_THREAD_CPUTIME_ID), w0 = clock_s(CLOCK_MONOTONIC);
    w->passes = 0;
    while (!rc && (w->passes == 0 || clock_s(CLOCK_MONOTONIC) - w0 < seconds)) {
        rc = pass(t, text, len, chunk, &w->ids);
        w->passes++;
    }
    w->cpu = (clock_s(CLOCK_THREAD_CPUTIME_ID) - c0) / w->passes;
    w->wall = (clock_s(CLOCK_MONOTONIC) - w0) / w->passes;
    return rc;
}

static void print_way(const char *name, size_t len, const struct tb_way *w)
{
    printf("  %-22s %6.1f MB/s  %9.0f tokens/s  (CPU time; wall %.1f MB/s), %d passes\n", name,
           len / 1e6 / w->cpu, w->ids / w->cpu, len / 1e6 / w->wall, w->passes);
}

/* s as a JSON string's contents: '"' and '\\' escaped, control bytes dropped. */
static void json_str(FILE *f, const char *s)
{
    for (; *s; s++)
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s >= 0x20)
            fputc(*s, f);
}

static void json_way(FILE *f, const char *name, size_t len, const struct tb_way *w)
{
    fprintf(f,
            "\"%s\": {\"mb_s\": %.3f, \"tok_s\": %.1f, \"mb_s_wall\": %.3f, \"ids\": %zu, "
            "\"passes\": %d}",
            name, len / 1e6 / w->cpu, w->ids / w->cpu, len / 1e6 / w->wall, w->ids, w->passes);
}

int cvlm_cli_bench_tokenizer(int argc, char **argv)
{
    struct tb_opts o;
    char *text = NULL;
    size_t len = 0;
    int rc = parse(argc, argv, &o);
    if (rc) {
        usage(rc < 0 ? stderr : stdout);
        return rc < 0 ? 2 : 0;
    }
    if ((rc = load_text(&o, &text, &len))) {
        fprintf(stderr, "cogvlm bench-tokenizer: %s\n", cvlm_last_error());
        return 1;
    }
    FILE *jf = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !jf) {
        fprintf(stderr, "cogvlm bench-tokenizer: %s: cannot create\n", o.json);
        free(text);
        return 1;
    }
    printf("cogvlm bench-tokenizer: %.2f MB of text%s%s, one thread\n", len / 1e6,
           o.text ? " from " : " (README.md + docs/*.md, repeated)", o.text ? o.text : "");
    if (jf)
        fprintf(jf, "{\"text_bytes\": %zu, \"chunk\": %zu, \"tokenizers\": [", len, o.chunk);
    for (int i = 0; !rc && i < o.n_tok; i++) {
        struct cvlm_tokenizer *t = NULL;
        struct tb_way whole, prompts;
        char label[64];
        if ((rc = cvlm_tokenizer_load(o.tok[i], &t)) ||
            (rc = measure(t, text, len, 0, o.seconds, &whole)) ||
            (rc = measure(t, text, len, o.chunk, o.seconds, &prompts))) {
            fprintf(stderr, "cogvlm bench-tokenizer: %s: %s\n", o.tok[i], cvlm_last_error());
            cvlm_tokenizer_destroy(t);
            break;
        }
        printf("%s (%d ids; %.2f bytes per token)\n", o.tok[i], cvlm_tokenizer_vocab_size(t),
               (double)len / (double)whole.ids);
        print_way("whole text, one call", len, &whole);
        snprintf(label, sizeof(label), "prompts <= %zu bytes", o.chunk);
        print_way(label, len, &prompts);
        if (jf) {
            fprintf(jf, "%s\n {\"path\": \"", i ? "," : "");
            json_str(jf, o.tok[i]);
            fprintf(jf, "\", \"vocab\": %d, \"bytes_per_token\": %.4f, ",
                    cvlm_tokenizer_vocab_size(t), (double)len / (double)whole.ids);
            json_way(jf, "whole", len, &whole);
            fprintf(jf, ", ");
            json_way(jf, "prompts", len, &prompts);
            fprintf(jf, "}");
        }
        cvlm_tokenizer_destroy(t);
    }
    if (jf) {
        fprintf(jf, "]}\n");
        if (fclose(jf) && !rc) {
            fprintf(stderr, "cogvlm bench-tokenizer: %s: write failed\n", o.json);
            rc = 1;
        }
    }
    free(text);
    return rc ? 1 : 0;
}
