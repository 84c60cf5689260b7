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
        self.rows_per_column = np.ones(len(first_steps), dtype=np.int64)  # logged rows in each column


def row_first_steps(steps, rows):
    """First step each row covers: its last step minus its `steps` count, plus one."""
    if not rows.shape[1]:
        return steps.copy()
    with np.errstate(invalid="ignore"):
        count = np.fmax.reduce(rows[:, :, stats.STAT_INDEX["steps"]], axis=1)  # NaN-skipping max
    count = np.where(np.isnan(count), 1, count)
    return steps - count.astype(np.int64) + 1


def aggregate_bins(rows, edges, stat_indices=None, sites=None):
    """`stats.aggregate_rows` over many bins at once: rows [n, n_sites, n_stats], bins
    [edges[c], edges[c+1]) (non-empty, ascending).  Returns [n_bins, n_sites', n_stats]
    for the sites in `sites` (default: all); statistics not in `stat_indices` (default:
    all) are left NaN.  Only the requested statistics of the requested sites are ever
    copied, so a view of a big run costs what the answer costs."""
    rows = np.asarray(rows, dtype=np.float64)
    starts = np.asarray(edges[:-1], dtype=np.intp)
    pick = (lambda a: a) if sites is None else (lambda a: a[:, sites])
    n_sites = rows.shape[1] if sites is None else len(sites)
    out = np.full((len(starts), n_sites, rows.shape[2]), np.nan)
    if not len(starts):
        return out
    steps = pick(rows[..., stats.STAT_INDEX["steps"]])
    for k in (range(len(stats.STATS)) if stat_indices is None else stat_indices):
        rule = stats.STATS[k].aggregate
        col = pick(rows[..., k])
        present = ~np.isnan(col)
        anyp = np.add.reduceat(present.astype(np.int64), starts, axis=0) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            if rule == "sum":
                val = np.add.reduceat(np.where(present, col, 0.0), starts, axis=0)
            elif rule == "min":
                val = np.minimum.reduceat(np.where(present, col, np.inf), starts, axis=0)
            elif rule == "max":
                val = np.maximum.reduceat(np.where(present, col, -np.inf), starts, axis=0)
            elif rule == "mean":
                weight = np.where(present, np.nan_to_num(steps, nan=1.0), 0.0)
                val = (np.add.reduceat(np.where(present, col, 0.0) * weight, starts, axis=0)
                       / np.add.reduceat(weight, starts, axis=0))
            elif rule == "last":
                index = np.arange(len(col)).reshape((-1,) + (1,) * (col.ndim - 1))
                last = np.maximum.reduceat(np.where(present, index, -1), starts, axis=0)
                val = np.take_along_axis(col, np.maximum(last, 0), axis=0)
            else:  # pragma: no cover - the table is fixed
                raise ValueError(rule)
        out[..., k] = np.where(anyp, val, np.nan)
    return out


_STATUS_STATS = tuple(stats.STAT_INDEX[n] for n in ("steps", "size") + stats.NONFINITE_STATS)


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
    where = np.nonzero(keep)[0]
    if len(where) and where[-1] - where[0] + 1 == len(where):
        where = slice(where[0], where[-1] + 1)   # the usual case: a view, not a copy
    steps, firsts, rows = steps[where], firsts[where], rows[where]
    n = len(steps)
    n_cols = min(n, max_columns)
    # Equal-count bins of consecutive rows: every column covers real rows (at least one).
    edges = np.linspace(0, n, n_cols + 1).round().astype(int)
    k = stats.STAT_INDEX[stat]
    sites = None if kind is None else np.array(site_indices, dtype=np.intp)
    combined = aggregate_bins(rows, edges, sorted(set(_STATUS_STATS + (k,))), sites=sites)
    values = np.ascontiguousarray(combined[..., k].T)                      # [sites, cols]
    status = np.ascontiguousarray(stats.nonfinite_status(combined).T)     # [sites, cols]
    col_first = firsts[edges[:-1]] if n_cols else np.zeros(0, dtype=np.int64)
    col_last = steps[edges[1:] - 1] if n_cols else np.zeros(0, dtype=np.int64)
    all_labels = run_data.labels
    labels = [all_labels[i] for i in site_indices]
    hm = Heatmap(site_indices, labels, col_first, col_last, values, status)
    hm.rows_per_column = np.diff(edges)
    return hm


def columns_of(hm, steps):
    """The column holding each training step of `steps`, -1 where no column covers it
    (outside the heatmap, or in a gap between logged rows)."""
    steps = np.asarray(steps, dtype=np.int64)
    if not len(hm.first_steps):
        return np.full(steps.shape, -1, dtype=np.int64)
    # Columns are consecutive and ascending: the first one ending at or after the step.
    col = np.searchsorted(hm.last_steps, steps, side="left")
    inside = col < len(hm.last_steps)
    col = np.minimum(col, len(hm.last_steps) - 1)
    inside &= hm.first_steps[col] <= steps
    return np.where(inside, col, -1)
