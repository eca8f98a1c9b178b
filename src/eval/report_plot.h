/* report_plot.h — the figures of a report (report_plot.c), called by report.c once the records
 * are loaded and ranked. report_plot.c reads struct report (report_data.h) and calls nothing in
 * report.c.
 */
#ifndef KVS_EVAL_REPORT_PLOT_H
#define KVS_EVAL_REPORT_PLOT_H

#include "eval/report_data.h"

/* Writes DIR/plots/ (data, scripts, and images when gnuplot is on PATH) and fills R->figs;
 * 0, or -1 with a message in err. */
int report_plot_write(struct report *R, char *err, size_t err_size);

#endif
