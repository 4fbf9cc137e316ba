/* cli.h - subcommands of the `cogvlm` command line tool (build/cogvlm).
 *
 * Each subcommand lives in its own server/cli_<name>.c and has the signature of main():
 * argv[0] is the subcommand name. It prints errors to stderr and returns the exit status
 * (0 ok, 1 failure, 2 usage error).
 */
#ifndef CVLM_CLI_H
#define CVLM_CLI_H

int cvlm_cli_tokenize(int argc, char **argv);
int cvlm_cli_preprocess(int argc, char **argv);
int cvlm_cli_info(int argc, char **argv);
int cvlm_cli_golden(int argc, char **argv);
int cvlm_cli_run(int argc, char **argv);
int cvlm_cli_bench_batch(int argc, char **argv);
int cvlm_cli_bench(int argc, char **argv);

#endif
