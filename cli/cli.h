/* cli.h - subcommands of the `cogvlm` command line tool (build/cogvlm).
 *
 * Each subcommand lives in its own cli/cli_<name>.c and has the signature of main():
 * argv[0] is the subcommand name. It prints errors to stderr and returns the exit status
 * (0 ok, 1 failure, 2 usage error).
 */
#ifndef CVLM_CLI_H
#define CVLM_CLI_H

struct cvlm_model_opts;

/* The model placement options every subcommand that runs the model takes. */
#define CVLM_CLI_MODEL_USAGE                                            \
    "[--backend cpu|cuda] [--tp N] [--device N] [--threads N]\n       " \
    "[--kv-cache-dtype auto|f32|f16|bf16|int8]"
#define CVLM_CLI_MODEL_HELP                                                               \
    "--backend: cpu (default) or cuda; --tp N: tensor-parallel ranks (CPU: in-process\n"  \
    "ranks sharing --threads; CUDA: GPUs device..device+N-1); --threads: CPU threads,\n"  \
    "0 = one per core; --kv-cache-dtype: the KV cache's elements (auto: the backend's,\n" \
    "f32 on the CPU, bf16 on CUDA; f16 / bf16 halve the CPU cache, int8 quarters it\n"    \
    "with a scale per token and head; CUDA: bf16 only).\n"
/* If argv[*i] is one of those options, stores its value, advances *i past it and returns
 * 1; returns 0 for another argument and -1 (message printed) for a bad value. */
int cvlm_cli_model_opt(int argc, char **argv, int *i, struct cvlm_model_opts *o);
/* One step of an option loop over `--key value` pairs: returns 1 with *key and *val set
 * (and *i past the value), 0 for a model option it consumed, 2 for --help, -1 for a
 * missing value or a bad model option. */
int cvlm_cli_arg(int argc, char **argv, int *i, struct cvlm_model_opts *o, const char **key,
                 const char **val);

/* A boolean as the server's options spell it (true/1/yes/on, false/0/no/off) -> *out; 0,
 * or -1 with a message. */
int cvlm_cli_bool(const char *opt, const char *v, int *out);
int cvlm_cli_tokenize(int argc, char **argv);
int cvlm_cli_preprocess(int argc, char **argv);
int cvlm_cli_info(int argc, char **argv);
int cvlm_cli_golden(int argc, char **argv);
int cvlm_cli_run(int argc, char **argv);
int cvlm_cli_bench_batch(int argc, char **argv);
int cvlm_cli_bench(int argc, char **argv);
int cvlm_cli_bench_vlm(int argc, char **argv);
int cvlm_cli_bench_tokenizer(int argc, char **argv);

#endif
