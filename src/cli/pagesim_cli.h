/* pagesim_cli.h — `kvsieve pagesim` (see pagesim_cli.c). */
#ifndef KVS_PAGESIM_CLI_H
#define KVS_PAGESIM_CLI_H

/* argv[0] is the first option after "pagesim"; returns the exit code */
int pagesim_main(int argc, char **argv);

#endif
