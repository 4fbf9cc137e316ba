/* cli_tokenize.c - `cogvlm tokenize`: JSON lines in, JSON lines out, through the tokenizer.
 *
 *   cogvlm tokenize --tokenizer tokenizer.model            {"text": "..."} -> {"ids": [...]}
 *   cogvlm tokenize --tokenizer DIR/tokenizer.json         (byte-level BPE: the same)
 *   cogvlm tokenize --tokenizer tokenizer.model --decode   {"ids": [...]}  -> {"text": "..."}
 *
 * One output line per input line, in order, flushed line by line (usable as a coprocess).
 * Other keys in an input object are ignored, so a golden file can be piped in as it is.
 * The first bad line stops the run: "line N: why" on stderr and exit status 1.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "engine/error.h"
#include "engine/text/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: cogvlm tokenize --tokenizer PATH [--decode]\n\n"
               "Reads JSON lines on stdin and writes one JSON line per input line:\n"
               "  default:   {\"text\": \"...\"}  ->  {\"ids\": [...]}   (no BOS/EOS added)\n"
               "  --decode:  {\"ids\": [...]}    ->  {\"text\": \"...\"}\n\n"
               "options:\n"
               "  --tokenizer PATH  tokenizer.model (SentencePiece), tokenizer.json (byte-level\n"
               "                    BPE), or a model directory with one of them\n"
               "  --decode          decode ids instead of encoding text\n"
               "  -h, --help        this help\n");
}

/* Prints the line's output JSON (compact) and a newline; takes ownership of `out`. */
static int print_json(json_t *out)
{
    char *s = out ? json_dumps(out, JSON_COMPACT) : NULL;
    json_decref(out);
    if (!s)
        return cvlm_errf(CVLM_ENOMEM, "cannot serialize the output");
    int ok = fputs(s, stdout) >= 0 && fputc('\n', stdout) != EOF && fflush(stdout) == 0;
    free(s);
    return ok ? 0 : cvlm_errf(CVLM_EIO, "cannot write to stdout");
}

static int encode_line(const struct cvlm_tokenizer *tok, json_t *in)
{
    json_t *text = json_object_get(in, "text");
    int32_t *ids = NULL;
    size_t n = 0;
    if (!json_is_string(text))
        return cvlm_errf(CVLM_EINVAL, "expected an object with a string \"text\"");
    int rc =
        cvlm_tokenizer_encode(tok, json_string_value(text), json_string_length(text), &ids, &n);
    if (rc)
        return rc;
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, json_integer(ids[i]))) {
            json_decref(arr);
            arr = NULL;
        }
    free(ids);
    if (!arr)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    return print_json(json_pack("{s:o}", "ids", arr));
}

static int decode_line(const struct cvlm_tokenizer *tok, json_t *in)
{
    json_t *arr = json_object_get(in, "ids");
    if (!json_is_array(arr))
        return cvlm_errf(CVLM_EINVAL, "expected an object with an array \"ids\"");
    size_t n = json_array_size(arr);
    int32_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    if (!ids)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        json_int_t x = json_is_integer(v) ? json_integer_value(v) : -1;
        if (!json_is_integer(v) || x < 0 || x > INT32_MAX) {
            free(ids);
            return cvlm_errf(CVLM_EINVAL, "ids[%zu] is not a non-negative 32-bit integer", i);
        }
        ids[i] = (int32_t)x;
    }
    char *text = NULL;
    size_t len = 0;
    int rc = cvlm_tokenizer_decode(tok, ids, n, &text, &len);
    free(ids);
    if (rc)
        return rc;
    json_t *s = json_stringn(text, len); /* decode output is always valid UTF-8 */
    free(text);
    if (!s)
        return cvlm_errf(CVLM_EFORMAT, "decoded text is not valid UTF-8");
    return print_json(json_pack("{s:o}", "text", s));
}

/* Runs every stdin line through encode or decode. 0, or 1 after reporting a bad line. */
static int run_lines(const struct cvlm_tokenizer *tok, int decode)
{
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t got;
    int status = 0;

    while (!status && (got = getline(&line, &cap, stdin)) >= 0) {
        json_error_t jerr;
        lineno++;
        cvlm_clear_error();
        json_t *in = json_loadb(line, (size_t)got, JSON_ALLOW_NUL, &jerr);
        int rc;
        if (!in)
            rc = cvlm_errf(CVLM_EINVAL, "invalid JSON: %s (column %d)", jerr.text, jerr.column);
        else if (!json_is_object(in))
            rc = cvlm_errf(CVLM_EINVAL, "expected a JSON object");
        else
            rc = decode ? decode_line(tok, in) : encode_line(tok, in);
        json_decref(in);
        if (rc) {
            fprintf(stderr, "cogvlm tokenize: line %zu: %s\n", lineno, cvlm_last_error());
            status = 1;
        }
    }
    if (!status && ferror(stdin)) {
        fprintf(stderr, "cogvlm tokenize: error reading stdin\n");
        status = 1;
    }
    free(line);
    return status;
}

int cvlm_cli_tokenize(int argc, char **argv)
{
    const char *path = NULL;
    int decode = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) {
            path = argv[++i];
        } else if (!strcmp(argv[i], "--decode")) {
            decode = 1;
        } else {
            fprintf(stderr, "cogvlm tokenize: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "cogvlm tokenize: --tokenizer PATH is required\n");
        usage(stderr);
        return 2;
    }

    struct cvlm_tokenizer *tok = NULL;
    int rc = cvlm_tokenizer_load(path, &tok);
    if (rc) {
        fprintf(stderr, "cogvlm tokenize: %s\n", cvlm_last_error());
        return 1;
    }
    int status = run_lines(tok, decode);
    cvlm_tokenizer_destroy(tok);
    return status;
}
