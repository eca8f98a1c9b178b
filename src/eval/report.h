/* report.h — turns evaluation results (JSON Lines) into a CSV, a markdown report and plots.
 *
 * Does: read DIR/results.jsonl, every DIR/peer_*.jsonl (sorted by name) and any extra files, one
 * result record per line (fields: see the table in report.c), and write
 *   DIR/results.csv          one row per record, fixed columns, RFC 4180 quoting, CRLF line ends
 *   DIR/report.md            header, per model: summary and per-task tables for each mode, a
 *                            ppl / KL table, a kvsieve-vs-peers table when peers are present;
 *                            then links to the plots
 *   DIR/plots/NAME.{dat,gp}  data and gnuplot script of each figure (re-plot: cd plots; gnuplot
 *                            NAME.gp), rendered to NAME.png (pngcairo 1400x900) and NAME.svg
 *                            when gnuplot is on PATH; its output goes to DIR/plots/gnuplot.log
 * Figures (NAME, one set per model; with several models NAME gets a _MODEL suffix):
 *   score_vs_ratio_MODE (one per mode), kvbytes_vs_ratio, decode_vs_ratio, ppl_vs_budget,
 *   kl_vs_budget; a figure without data is not written.
 * Malformed lines are skipped, with a warning per line (the first few per file) and a count, on
 * the log sink (stderr). A later record with the same (system, run) key replaces an earlier one,
 * so a resumed sweep can append. Missing values print as "–" in the tables.
 * Does not: run evaluations, or fail because gnuplot is missing (the report then says the plots
 * were not rendered). Library code: prints nothing to stdout and never exits.
 */
#ifndef KVS_EVAL_REPORT_H
#define KVS_EVAL_REPORT_H

#include <stddef.h>

/* Returns 0 on success; otherwise -1 with a message in err (I/O errors, unreadable extra file, no
 * records at all). extra_files may be NULL when n_extra is 0. */
int eval_report(const char *dir, const char *const *extra_files, int n_extra, char *err,
                size_t err_size);

#endif
