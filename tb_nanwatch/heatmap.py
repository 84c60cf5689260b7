"""Layers x steps matrices for the plugin's heatmap route and the CLI's --png.

Columns bin consecutive rows; each bin is combined by the statistics table's
rules (`stats.aggregate_rows`), so a NaN or Inf anywhere in a bin shows in its
status code and is never averaged away.
"""

import numpy as np

from tb_nanwatch import stats

SOURCES = ("rows", "flight")


class HeatmapError(ValueError):
    """A request the data cannot answer (unknown kind or statistic, empty range)."""


class Heatmap:
    def __init__(self, site_indices, labels, first_steps, last_steps, values, status):
        self.site_indices = site_indices  # rows: indices into run_data.sites, execution order
        self.labels = labels
        self.first_steps = first_steps    # per column: first training step it covers
        self.last_steps = last_steps      # per column: last training step it covers
        self.values = values              # [n_sites, n_columns] float64, NaN = not measured
        self.status = status              # [n_sites, n_columns] uint8, stats.STATUS_NAMES


def row_first_steps(steps, rows):
    """First step each row covers: its last step minus its `steps` count, plus one."""
    count = rows[:, :, stats.STAT_INDEX["steps"]]
    count = np.nanmax(np.where(np.isnan(count), 1, count), axis=1) if rows.shape[1] else np.ones(len(steps))
    return steps - count.astype(np.int64) + 1


def build(run_data, stat="max_abs", kind=None, max_columns=500, first_step=None, last_step=None,
          source="rows"):
    if stat not in stats.STAT_INDEX:
        raise HeatmapError("unknown statistic %r; one of: %s" % (stat, ", ".join(stats.STAT_NAMES)))
    if kind is not None and kind not in stats.KINDS:
        raise HeatmapError("unknown kind %r; one of: %s" % (kind, ", ".join(stats.KINDS)))
    if source not in SOURCES:
        raise HeatmapError("unknown source %r; one of: %s" % (source, ", ".join(SOURCES)))
    if max_columns < 1:
        raise HeatmapError("max_columns must be at least 1")
    steps, rows = (run_data.steps, run_data.rows) if source == "rows" else (run_data.flight_steps, run_data.flight_rows)
    site_indices = [i for i, s in enumerate(run_data.sites) if kind is None or s["kind"] == kind]
    firsts = row_first_steps(steps, rows) if len(steps) else steps
    keep = np.ones(len(steps), dtype=bool)
    if first_step is not None:
        keep &= steps >= first_step
    if last_step is not None:
        keep &= firsts <= last_step
    steps, firsts, rows = steps[keep], firsts[keep], rows[keep][:, site_indices, :]
    n = len(steps)
    n_cols = min(n, max_columns)
    # Equal-count bins of consecutive rows: every column covers real rows.
    edges = np.linspace(0, n, n_cols + 1).round().astype(int)
    values = np.full((len(site_indices), n_cols), np.nan)
    status = np.zeros((len(site_indices), n_cols), dtype=np.uint8)
    col_first = np.zeros(n_cols, dtype=np.int64)
    col_last = np.zeros(n_cols, dtype=np.int64)
    k = stats.STAT_INDEX[stat]
    for c in range(n_cols):
        lo, hi = edges[c], edges[c + 1]
        combined = stats.aggregate_rows(rows[lo:hi], axis=0) if hi - lo > 1 else rows[lo]
        values[:, c] = combined[:, k]
        status[:, c] = stats.nonfinite_status(combined)
        col_first[c], col_last[c] = firsts[lo], steps[hi - 1]
    labels = [run_data.labels[i] for i in site_indices]
    return Heatmap(site_indices, labels, col_first, col_last, values, status)
