/* cli.c - entry point of build/cogvlm: dispatches to the subcommands of cli.h. */
#include "cli/cli.h"

#include "engine/model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cli_cmd {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
};

static const struct cli_cmd cmds[] = {
    {"run", cvlm_cli_run, "answer one prompt (optionally about an image), streamed"},
    {"info", cvlm_cli_info, "load a checkpoint (config.json + safetensors) and describe it"},
    {"tokenize", cvlm_cli_tokenize, "JSON lines {\"text\":...} on stdin -> {\"ids\":[...]}"},
    {"preprocess", cvlm_cli_preprocess, "decode + resize an image, write raw RGB bytes"},
    {"bench-batch", cvlm_cli_bench_batch, "scheduler throughput at several concurrencies"},
    {"golden", cvlm_cli_golden, "check the engine against a reference fixture"},
    {"bench", cvlm_cli_bench, "CPU prefill/decode/vision throughput on random weights"},
    {"bench-vlm", cvlm_cli_bench_vlm, "image request + batched decode cost (17B / CogVLM2 shapes)"},
    {"bench-tokenizer", cvlm_cli_bench_tokenizer, "tokenizer encoding MB/s on one core"},
};

int cvlm_cli_bool(const char *opt, const char *v, int *out)
{
    static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no",
                                                                                "off"};
    for (int k = 0; v && k < 4; k++)
        if (!strcmp(v, yes[k]) || !strcmp(v, no[k])) {
            *out = !strcmp(v, yes[k]);
            return 0;
        }
    fprintf(stderr, "cogvlm: %s must be true or false, not '%s'\n", opt, v ? v : "");
    return -1;
}

int cvlm_cli_model_opt(int argc, char **argv, int *i, struct cvlm_model_opts *o)
{
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    char *end;
    long n;
    if (strcmp(a, "--backend") && strcmp(a, "--tp") && strcmp(a, "--threads") &&
        strcmp(a, "--device") && strcmp(a, "--kv-cache-dtype"))
        return 0;
    if (!v) {
        fprintf(stderr, "cogvlm: %s needs a value\n", a);
        return -1;
    }
    *i += 1;
    if (!strcmp(a, "--backend")) {
        if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
            fprintf(stderr, "cogvlm: --backend must be cpu or cuda, not '%s'\n", v);
            return -1;
        }
        o->backend = strcmp(v, "cuda") ? CVLM_BACKEND_CPU : CVLM_BACKEND_CUDA;
        return 1;
    }
    if (!strcmp(a, "--kv-cache-dtype")) {
        static const char *const names[] = {"auto", "f32", "f16", "bf16", "int8"};
        for (int k = 0; k < 5; k++)
            if (!strcmp(v, names[k])) {
                o->kv_cache_dtype = k; /* enum cvlm_kv_cache_dtype, in the same order */
                return 1;
            }
        fprintf(stderr, "cogvlm: --kv-cache-dtype must be auto, f32, f16, bf16 or int8, not '%s'\n",
                v);
        return -1;
    }
    n = strtol(v, &end, 10);
    if (*end || end == v || n < 0 || n > 4096 || (!strcmp(a, "--tp") && n < 1)) {
        fprintf(stderr, "cogvlm: bad value '%s' for %s\n", v, a);
        return -1;
    }
    if (!strcmp(a, "--tp"))
        o->tp = (int)n;
    else if (!strcmp(a, "--threads"))
        o->threads = (int)n;
    else
        o->device = (int)n;
    return 1;
}

int cvlm_cli_arg(int argc, char **argv, int *i, struct cvlm_model_opts *o, const char **key,
                 const char **val)
{
    int rc = cvlm_cli_model_opt(argc, argv, i, o);
    if (rc)
        return rc < 0 ? -1 : 0;
    *key = argv[*i];
    if (!strcmp(*key, "--help"))
        return 2;
    if (*i + 1 >= argc)
        return -1;
    *val = argv[++*i];
    return 1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: cogvlm <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        fprintf(f, "  %-15s %s\n", cmds[i].name, cmds[i].help);
    fprintf(f, "\n`cogvlm <command> --help` describes each command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (!strcmp(argv[1], cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "cogvlm: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
