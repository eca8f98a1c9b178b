/* batch_cli.h — `kvsieve batch` (batch_cli.c). */
#ifndef KVS_BATCH_CLI_H
#define KVS_BATCH_CLI_H

/* argv after "batch"; returns the process exit code */
int batch_main(int argc, char **argv);

#endif
