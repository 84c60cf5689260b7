"""The read side's pure functions: the one aggregation rule, the layer tree, honest columns."""

import types

import numpy as np
import pytest
import synthetic

from tb_nanwatch import heatmap, stats, summary

COL = stats.STAT_INDEX


def random_rows(n=12, sites=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.5, 2.0, size=(n, sites, len(stats.STATS)))
    rows[..., COL["steps"]] = rng.integers(1, 5, size=(n, sites))
    rows[rng.random(rows.shape) < 0.1] = np.nan
    return rows


def test_aggregate_is_the_table_rule_per_slice():
    rows = random_rows()
    starts = [0, 3, 4, 9]
    got = stats.aggregate(rows, starts, axis=0)
    for j, (a, b) in enumerate(zip(starts, starts[1:] + [len(rows)])):
        part = rows[a:b]
        for k, stat in enumerate(stats.STATS):
            col = part[..., k]
            present = ~np.isnan(col)
            with np.errstate(invalid="ignore"):
                if stat.aggregate == "sum":
                    want = np.where(present, col, 0).sum(0)
                elif stat.aggregate == "min":
                    want = np.where(present, col, np.inf).min(0)
                elif stat.aggregate == "max":
                    want = np.where(present, col, -np.inf).max(0)
                elif stat.aggregate == "mean":
                    w = np.where(present, np.nan_to_num(part[..., COL["steps"]], nan=1.0), 0)
                    want = (np.where(present, col, 0) * w).sum(0) / w.sum(0)
                else:
                    pytest.skip("rule %s has no reference here" % stat.aggregate)
            want = np.where(present.any(0), want, np.nan)
            np.testing.assert_allclose(got[j, :, k], want, equal_nan=True, err_msg=stat.name)


def test_aggregate_rows_and_bins_are_the_same_rule():
    rows = random_rows()
    np.testing.assert_allclose(
        stats.aggregate_rows(rows[2:7]), heatmap.aggregate_bins(rows, [2, 7])[0], equal_nan=True
    )
    # Along the site axis with the across-sites rules: steps is not summed over sites.
    across = stats.aggregate(rows, [0, 2], axis=1, rules=stats.ACROSS_SITES)
    assert across.shape == (12, 2, len(stats.STATS))
    np.testing.assert_allclose(
        across[:, 0, COL["steps"]], np.fmax(rows[:, 0, COL["steps"]], rows[:, 1, COL["steps"]])
    )
    np.testing.assert_allclose(
        across[:, 1, COL["size"]],
        np.nansum(rows[:, 2:, COL["size"]], axis=1)
        * np.where(np.isnan(rows[:, 2:, COL["size"]]).all(1), np.nan, 1),
    )


def test_a_slice_of_nothing_measured_stays_nan():
    rows = np.full((4, 2, len(stats.STATS)), np.nan)
    out = stats.aggregate(rows, [0, 2])
    assert np.isnan(out).all()


def labels(tree):
    return [("  " * n.depth) + n.level[0] + ":" + n.label for n in tree.nodes]


def test_layer_tree_folds_paths_and_numbered_blocks():
    names = [
        "Conv1",
        "Conv1_relu",
        "block_1_expand",
        "block_1_expand_BN",
        "block_2_expand",
        "encoder/block/dense",
        "encoder/block/dense_1",
        "encoder/out",
        "dense_1",
    ]
    sites = [summary.make_site(n, "activation") for n in names] + [
        summary.make_site("Conv1", "weight", "kernel")
    ]
    tree = heatmap.layer_tree(sites, range(len(sites)))
    assert labels(tree) == [
        "g:Conv1",
        "  l:Conv1",
        "    s:activation",
        "    s:weight kernel",
        "  l:Conv1_relu",
        "    s:activation",
        "g:block_1",
        "  l:block_1_expand",
        "    s:activation",
        "  l:block_1_expand_BN",
        "    s:activation",
        "l:block_2_expand",
        "  s:activation",  # a block of one layer is just the layer
        "g:encoder",
        "  g:block",
        "    l:dense",
        "      s:activation",
        "    l:dense_1",
        "      s:activation",
        "  l:out",
        "    s:activation",
        "l:dense_1",
        "  s:activation",
    ]
    # Every node's sites are one slice of `order`; parents come before their children.
    for r, node in enumerate(tree.nodes):
        members = {int(i) for i in tree.order[node.start : node.end]}
        if node.level == "site":
            assert members == {node.site}
        elif node.level == "layer":
            assert members == {i for i, s in enumerate(sites) if s["layer"] == node.name}
        if node.parent is not None:
            parent = tree.nodes[node.parent]
            assert node.parent < r and parent.start <= node.start and node.end <= parent.end


def test_mobilenet_sized_tree_fits_on_one_screen():
    sites = synthetic.mobilenet_sites()
    assert len(sites) == 944
    tree = heatmap.layer_tree(sites, range(len(sites)))
    layers = [n for n in tree.nodes if n.level == "layer"]
    assert len(layers) == 157  # 156 layers and the model (the loss site)
    top = [n for n in tree.nodes if n.depth == 0]
    assert len(top) <= 32, len(top)
    assert sorted(int(i) for i in tree.order) == list(range(944))


def test_layer_row_is_the_worst_of_its_sites():
    sites = synthetic.sites_for()
    data_rows = np.stack([synthetic.finite_row(len(sites), s) for s in range(4)])
    # dense_1: activation +Inf at row 2, its kernel's gradient NaN at row 2: the layer is "mixed" there.
    act = next(
        i for i, s in enumerate(sites) if s["layer"] == "dense_1" and s["kind"] == "activation"
    )
    grad = next(
        i for i, s in enumerate(sites) if s["layer"] == "dense_1" and s["kind"] == "weight_grad"
    )
    data_rows[2, act, COL["posinf"]] = 4
    data_rows[2, grad, COL["nan"]] = 1
    data_rows[1, act, COL["max_abs"]] = 1e6
    data = types.SimpleNamespace(
        sites=sites,
        steps=np.arange(4),
        rows=data_rows,
        labels=[summary.site_label(s) for s in sites],
        flight_steps=np.zeros(0, np.int64),
        flight_rows=np.zeros((0, len(sites), len(stats.STATS))),
    )
    hm = heatmap.build(data, stat="max_abs", rows_mode="tree")
    layer_row = next(
        r for r, n in enumerate(hm.tree.nodes) if n.level == "layer" and n.name == "dense_1"
    )
    assert stats.STATUS_NAMES[hm.status[layer_row, 2]] == "mixed"
    assert stats.STATUS_NAMES[hm.status[layer_row, 1]] == "finite"
    assert hm.values[layer_row, 1] == 1e6  # max_abs over the layer's sites
    other = next(r for r, n in enumerate(hm.tree.nodes) if n.level == "layer" and n.name == "dense")
    assert hm.status[other, 2] == 0


@pytest.mark.parametrize(
    "n,columns,own",
    [(1000, 50, 333), (1000, 50, 0), (1000, 50, 999), (96, 3, 1), (10, 3, 5), (7, 7, 3)],
)
def test_first_non_finite_row_gets_a_column_of_its_own(n, columns, own):
    edges = heatmap.bin_edges(n, columns, [own])
    assert edges[0] == 0 and edges[-1] == n and np.all(np.diff(edges) > 0)
    assert len(edges) - 1 == min(n, columns)
    assert own in edges and own + 1 in edges


def test_late_cells_are_the_ones_that_broke_later_in_the_column():
    sites = synthetic.sites_for()
    rows = [synthetic.finite_row(len(sites), s, steps=10) for s in (9, 19, 29)]
    # Row 2 covers steps 20-29: site 3 non-finite from step 22 (the first), site 4 from step 27.
    for site, start in ((3, 22), (4, 27)):
        rows[1][site, COL["nan"]] = 1
        rows[1][site, COL["first_nonfinite_step"]] = start
    data = types.SimpleNamespace(
        sites=sites,
        steps=np.array([9, 29, 39]),
        rows=np.stack(rows),
        labels=[summary.site_label(s) for s in sites],
        flight_steps=np.zeros(0, np.int64),
        flight_rows=np.zeros((0, len(sites), len(stats.STATS))),
    )
    hm = heatmap.build(data, stat="nan", first_step_of_run=22)
    assert hm.status[3, 1] == hm.status[4, 1] == 1
    assert not hm.late[3, 1] and hm.late[4, 1]
    assert hm.late.sum() == 1
