/* eval_cli.h — `kvsieve eval` (see eval_cli.c). */
#ifndef KVS_EVAL_CLI_H
#define KVS_EVAL_CLI_H

#ifndef KVS_GIT_FALLBACK
#define KVS_GIT_FALLBACK "unknown" /* recorded when `git describe` is not available */
#endif

/* argv[0] is the subcommand; returns the exit code */
int eval_main(int argc, char **argv);

#endif
