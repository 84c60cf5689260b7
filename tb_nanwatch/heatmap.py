"""Layers x steps matrices for the plugin's heatmap route and the CLI's --png.

Columns bin consecutive rows; each bin is combined by the statistics table's
rules (`stats.aggregate_rows`), so a NaN or Inf anywhere in a bin shows in its
status code and is never averaged away.
"""

import collections
import re

import numpy as np

from tb_nanwatch import runview, stats
from tb_nanwatch.timeline import row_first_steps, select_rows  # noqa: F401 (their home)

SOURCES = ("rows", "flight")


class HeatmapError(ValueError):
    """A request the data cannot answer (unknown kind or statistic, empty range)."""


class Heatmap:
    def __init__(self, site_indices, labels, first_steps, last_steps, values, status):
        self.site_indices = site_indices  # rows: indices into run_data.sites, execution order
        self.labels = labels
        self.first_steps = first_steps  # per column: first training step it covers
        self.last_steps = last_steps  # per column: last training step it covers
        self.values = values  # [n_sites, n_columns] float64, NaN = not measured
        self.status = status  # [n_sites, n_columns] uint8, stats.STATUS_NAMES
        self.rows_per_column = np.ones(
            len(first_steps), dtype=np.int64
        )  # logged rows in each column


def aggregate_bins(rows, edges, stat_indices=None, sites=None):
    """`stats.aggregate` of rows [n, n_sites, n_stats] into bins [edges[c], edges[c+1])
    (non-empty, ascending): [n_bins, n_sites', n_stats] for the sites in `sites` (default
    all).  Only the requested statistics of the requested sites are ever copied."""
    rows = np.asarray(rows)[: edges[-1]] if len(edges) else np.asarray(rows)[:0]
    if sites is not None:
        rows = rows[:, sites]
    return stats.aggregate(rows, np.asarray(edges[:-1], dtype=np.intp), 0, stat_indices)


_STATUS_STATS = tuple(
    stats.STAT_INDEX[n] for n in ("steps", "size", "first_nonfinite_step") + stats.NONFINITE_STATS
)

ROW_MODES = ("tree", "sites")
# A layer named `block_13_expand_BN` (Keras' MobileNetV2, EfficientNet, ...) folds into
# the group `block_13` with the other layers of its block.
_NUMBERED_BLOCK = re.compile(r"^(.*?[A-Za-z]_?\d+)_(.+)$")


class Node:
    """One row of the layers x steps view: a group of layers, a layer, or one site.
    Its sites are `order[start:end]` of the `Tree` (contiguous by construction)."""

    __slots__ = ("level", "name", "label", "depth", "parent", "start", "end", "site")

    def __init__(self, level, name, label, depth, parent, start, end, site=None):
        self.level, self.name, self.label, self.depth = level, name, label, depth
        self.parent, self.start, self.end, self.site = parent, start, end, site

    def as_json(self):
        out = {
            "level": self.level,
            "name": self.name,
            "label": self.label,
            "depth": self.depth,
            "parent": self.parent,
            "n_sites": self.end - self.start,
        }
        if self.site is not None:
            out["site"] = int(self.site)
        return out


class Tree:
    """Groups > layers > sites in tree order.  `order`: the site indices, grouped so
    that every node's sites are one slice of it; `nodes`: pre-order (a parent comes
    right before its children)."""

    def __init__(self, nodes, order):
        self.nodes = nodes
        self.order = order


def layer_name(site):
    return site.get("layer") or ("loss" if site.get("kind") == "loss" else "(unnamed)")


def _group_path(name):
    """The groups a layer folds into, outermost first: its path's prefixes
    (`encoder/block_2/dense` -> `encoder`, `encoder/block_2`) and a numbered block."""
    parts = name.split("/")
    paths = ["/".join(parts[:i]) for i in range(1, len(parts))]
    block = _NUMBERED_BLOCK.match(parts[-1])
    if block:
        paths.append("/".join(parts[:-1] + [block.group(1)]))
    return paths


def layer_tree(sites, site_indices):
    """The rows of the layers x steps view of `sites[i] for i in site_indices`.

    Layers in order of their first site (execution order: forward first); each
    layer's sites follow it in execution order; layers with a common path prefix
    or numbered block fold into a group when it holds at least two layers.  Pure:
    names in, nodes out."""
    layers = {}  # name -> site indices, insertion = first appearance
    for i in site_indices:
        layers.setdefault(layer_name(sites[i]), []).append(int(i))
    # Which groups hold at least two layers (a group of one is just its layer).
    counts = collections.Counter(g for name in layers for g in _group_path(name))
    # A layer named like a group leads it (`Conv1` heads `Conv1_bn`, `Conv1_relu`).
    heads = {name for name in layers if counts.get(name)}
    for name in heads:
        counts[name] += 1
    children = collections.OrderedDict()  # parent path ("" = root) -> ordered child keys
    for name in layers:
        # Keys say what they are: a group may share its name with a layer (`Conv1`, `Conv1_bn`).
        chain = (
            [("group", "")]
            + [
                ("group", g)
                for g in _group_path(name) + ([name] if name in heads else [])
                if counts[g] > 1
            ]
            + [("layer", name)]
        )
        for parent, child in zip(chain, chain[1:]):
            entry = children.setdefault(parent, [])
            if child not in entry:
                entry.append(child)
    nodes, order = [], []

    def visit(node_key, parent_key, parent_row, depth):
        row = len(nodes)
        level, key = node_key
        if level == "layer":
            start = len(order)
            label = (
                key[len(parent_key) + 1 :]
                if parent_key and key.startswith(parent_key + "/")
                else key
            )
            node = Node("layer", key, label, depth, parent_row, start, start)
            nodes.append(node)
            for i in layers[key]:
                s = sites[i]
                site_label = " ".join(
                    p for p in (stats.kind_words(s["kind"]), s.get("tensor", "")) if p
                )
                nodes.append(
                    Node(
                        "site", key, site_label, depth + 1, row, len(order), len(order) + 1, site=i
                    )
                )
                order.append(i)
            node.end = len(order)
            return
        label = (
            key[len(parent_key) + 1 :] if parent_key and key.startswith(parent_key + "/") else key
        )
        node = Node("group", key, label, depth, parent_row, len(order), len(order))
        nodes.append(node)
        for child in children.get(node_key, []):
            visit(child, key, row, depth + 1)
        node.end = len(order)

    for child in children.get(("group", ""), []):
        visit(child, "", None, 0)
    return Tree(nodes, np.array(order, dtype=np.intp))


def aggregate_tree(tree, combined):
    """Rows of `tree` from per-site bins: combined [n_bins, n_sites, n_stats] (all sites
    of the run) -> [n_nodes, n_bins, n_stats], a layer or group by the table's rules over
    its sites (stats.ACROSS_SITES): NaN or Inf in any site shows in the layer's status."""
    n_bins = combined.shape[0]
    out = np.full((len(tree.nodes), n_bins, combined.shape[2]), np.nan)
    if not len(tree.order) or not n_bins:
        return out
    grouped = combined[:, tree.order]
    layer_rows = [r for r, n in enumerate(tree.nodes) if n.level == "layer"]
    starts = [tree.nodes[r].start for r in layer_rows]
    per_layer = stats.aggregate(
        grouped, starts, axis=1, rules=stats.ACROSS_SITES
    )  # [bins, layers, stats]
    for j, r in enumerate(layer_rows):
        out[r] = per_layer[:, j]
    for r, node in enumerate(tree.nodes):
        if node.level == "site":
            out[r] = grouped[:, node.start]
    # Groups combine their layers (contiguous in layer order): by the same rules again.
    layer_start_index = {tree.nodes[r].start: j for j, r in enumerate(layer_rows)}
    for r, node in enumerate(tree.nodes):
        if node.level != "group" or node.end == node.start:
            continue
        a = layer_start_index[node.start]
        b = a + sum(1 for q in layer_rows if node.start <= tree.nodes[q].start < node.end)
        out[r] = stats.aggregate(per_layer[:, a:b], (0,), axis=1, rules=stats.ACROSS_SITES)[:, 0]
    return out


def bin_edges(n, max_columns, own_columns=()):
    """Edges of at most `max_columns` bins of consecutive rows out of `n` (equal counts),
    where each row index in `own_columns` gets a column of its own (the row holding the
    first non-finite step: never merged with rows before or after it)."""
    own = sorted({int(r) for r in own_columns if 0 <= r < n})
    if not own or n <= max_columns:
        return np.linspace(0, n, min(n, max_columns) + 1).round().astype(int)
    forced = sorted({e for r in own for e in (r, r + 1)})

    def edges_for(budget):
        edges = set(np.linspace(0, n, budget + 1).round().astype(int).tolist()) | set(forced)
        return sorted(e for e in edges if 0 <= e <= n)

    budget = max(1, max_columns - 2 * len(own))
    edges = edges_for(budget)
    while len(edges) - 1 < max_columns and budget < max_columns:  # use every column allowed
        budget += 1
        edges = edges_for(budget)  # may be one over: trimmed below
    # One over: merge the two smallest neighbouring bins that no forced edge separates.
    while len(edges) - 1 > max_columns:
        interior = [i for i in range(1, len(edges) - 1) if edges[i] not in forced] or list(
            range(1, len(edges) - 1)
        )  # 1 or 2 columns asked: no room for it
        i = min(interior, key=lambda i: edges[i + 1] - edges[i - 1])
        edges.pop(i)
    return np.array(edges, dtype=int)


def build(
    run_data,
    stat="max_abs",
    kind=None,
    max_columns=500,
    first_step=None,
    last_step=None,
    source="rows",
    rows_mode="sites",
    first_step_of_run=None,
):
    """The heatmap of one statistic.  rows_mode "sites": one row per site (execution
    order); "tree": groups > layers > sites (`Heatmap.tree`).  `first_step_of_run`: the
    first non-finite step, whose row gets a column of its own."""
    if stat not in stats.STAT_INDEX:
        raise HeatmapError("unknown statistic %r; one of: %s" % (stat, ", ".join(stats.STAT_NAMES)))
    if kind is not None and kind not in stats.KINDS:
        raise HeatmapError("unknown kind %r; one of: %s" % (kind, ", ".join(stats.KINDS)))
    if source not in SOURCES:
        raise HeatmapError("unknown source %r; one of: %s" % (source, ", ".join(SOURCES)))
    if rows_mode not in ROW_MODES:
        raise HeatmapError("unknown rows %r; one of: %s" % (rows_mode, ", ".join(ROW_MODES)))
    if max_columns < 1:
        raise HeatmapError("max_columns must be at least 1")
    view = runview.as_view(run_data)
    # "rows": the one timeline (logged rows, flight rows at step resolution around the
    # blow-up), read again from the run's files where a zoomed window needs finer rows.
    steps, rows = (
        view.rows_in(first_step, last_step, max_columns)
        if source == "rows"
        else (view.flight_steps, view.flight_rows)
    )
    run_data = view
    site_indices = [i for i, s in enumerate(run_data.sites) if kind is None or s["kind"] == kind]
    steps, firsts, rows = select_rows(steps, rows, first_step, last_step)
    n = len(steps)
    own = []
    if first_step_of_run is not None and n:
        own = np.nonzero((firsts <= first_step_of_run) & (first_step_of_run <= steps))[0][:1]
    edges = bin_edges(n, max_columns, own)
    n_cols = len(edges) - 1
    k = stats.STAT_INDEX[stat]
    wanted = sorted(set(_STATUS_STATS + (k,)))
    col_first = firsts[edges[:-1]] if n_cols else np.zeros(0, dtype=np.int64)
    col_last = steps[edges[1:] - 1] if n_cols else np.zeros(0, dtype=np.int64)
    tree = None
    if rows_mode == "sites":
        sites = None if kind is None else np.array(site_indices, dtype=np.intp)
        combined = np.moveaxis(
            aggregate_bins(rows, edges, wanted, sites=sites), 0, 1
        )  # [sites, cols, stats]
    else:
        tree = layer_tree(run_data.sites, site_indices)
        combined = (
            aggregate_tree(tree, aggregate_bins(rows, edges, wanted))
            if n_cols
            else np.full((len(tree.nodes), 0, len(stats.STATS)), np.nan)
        )
    values = np.ascontiguousarray(combined[..., k])  # [rows, cols]
    status = np.ascontiguousarray(stats.nonfinite_status(combined))  # [rows, cols]
    all_labels = run_data.labels  # a property that builds every label: once, not per site
    labels = [all_labels[i] for i in site_indices]
    hm = Heatmap(site_indices, labels, col_first, col_last, values, status)
    hm.rows_per_column = np.diff(edges)
    hm.tree = tree
    hm.late = late_cells(combined, status, col_first, col_last, first_step_of_run)
    return hm


def late_cells(combined, status, col_first, col_last, first_step):
    """[rows, cols] bool: non-finite cells of the column holding the first non-finite step
    whose own first non-finite step came later in that column (propagated, or broken
    later), so they are drawn apart from the cells that were bad at that very step."""
    late = np.zeros(status.shape, dtype=bool)
    if first_step is None or not len(col_first):
        return late
    onset = combined[..., stats.STAT_INDEX["first_nonfinite_step"]]
    for c in np.nonzero((col_first <= first_step) & (first_step <= col_last))[0]:
        with np.errstate(invalid="ignore"):
            late[:, c] = (status[:, c] != 0) & (status[:, c] != 5) & (onset[:, c] > first_step)
    return late


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
