/* cli.c - entry point of build/cogvlm: dispatches to the subcommands of cli.h. */
#include "server/cli.h"

#include <stdio.h>
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
};

static void usage(FILE *f)
{
    fprintf(f, "usage: cogvlm <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        fprintf(f, "  %-12s %s\n", cmds[i].name, cmds[i].help);
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
