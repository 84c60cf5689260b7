"""The writer's host side and the row format: plain numpy, no TensorFlow."""

import json

import numpy as np
import pytest

from tb_nanwatch import metadata, reader, stats, summary
from tb_nanwatch.watch import host

COL = stats.STAT_INDEX


def _sites(*kinds):
    return [
        summary.make_site("layer_%d" % i, kind, "kernel" if kind.startswith("weight") else "")
        for i, kind in enumerate(kinds)
    ]


def _contribution(n, step, counts=None, size=4.0, norm=2.0):
    """One step's accumulator contribution, as device.device_step builds it."""
    row = np.full((n, len(stats.STATS)), np.nan)
    row[:, COL["steps"]] = 1
    row[:, COL["size"]] = size
    counts = np.zeros((n, 3)) if counts is None else np.asarray(counts, dtype=np.float64)
    for j, name in enumerate(stats.NONFINITE_STATS):
        row[:, COL[name]] = counts[:, j]
    bad = counts.sum(axis=1) > 0
    row[:, COL["nonfinite_steps"]] = bad
    row[:, COL["first_nonfinite_step"]] = np.where(bad, step, np.inf)
    row[:, COL["norm"]] = norm
    row[:, COL["max_norm"]] = norm
    return row


def _accumulate(acc, contribution, sampled):
    """The device's accumulation rule (device.device_step), written again in numpy."""
    out = acc.copy()
    for j, rule in enumerate(host.ACCUMULATE):
        new = contribution[:, j]
        if rule == "replace" or (rule == "replace_sampled" and sampled):
            out[:, j] = new
        elif rule == "sum":
            out[:, j] = acc[:, j] + np.nan_to_num(new)
        elif rule == "max":
            out[:, j] = np.maximum(acc[:, j], new)
        elif rule == "min":
            out[:, j] = np.minimum(acc[:, j], new)
    return out


def test_accumulation_rules_come_from_the_table():
    by_name = dict(zip(stats.STAT_NAMES, host.ACCUMULATE))
    assert by_name["nan"] == "sum" and by_name["first_nonfinite_step"] == "min"
    assert by_name["norm"] == "replace" and by_name["max_norm"] == "max"
    assert all(by_name[name] == "replace_sampled" for name in stats.SAMPLED_STATS)
    assert "norm" not in stats.SAMPLED_STATS and "max_abs" in stats.SAMPLED_STATS


def test_a_row_keeps_the_first_nonfinite_step_and_sums_counts():
    n = 3
    acc = host.initial_accumulators(n)
    acc = _accumulate(acc, _contribution(n, 10, norm=1.0), sampled=False)
    acc = _accumulate(
        acc, _contribution(n, 11, counts=[[0, 0, 0], [2, 0, 0], [0, 0, 0]], norm=5.0), sampled=True
    )
    acc = _accumulate(
        acc, _contribution(n, 12, counts=[[0, 0, 0], [1, 1, 0], [0, 0, 0]], norm=3.0), sampled=False
    )
    row = host.row_from_accumulators(acc)
    assert row[1, COL["nan"]] == 3 and row[1, COL["posinf"]] == 1
    assert row[1, COL["nonfinite_steps"]] == 2 and row[1, COL["first_nonfinite_step"]] == 11
    assert np.isnan(row[0, COL["first_nonfinite_step"]])
    assert row[0, COL["steps"]] == 3
    # The norm is the last step's, max_norm the largest of the row's steps.
    assert row[0, COL["norm"]] == 3.0 and row[0, COL["max_norm"]] == 5.0


def test_a_site_not_computed_has_no_values():
    acc = _accumulate(
        host.initial_accumulators(2),
        _contribution(2, 0, size=np.array([4.0, 0.0]), norm=0.0),
        sampled=True,
    )
    row = host.row_from_accumulators(acc)
    assert row[1, COL["size"]] == 0
    assert np.all(
        np.isnan(row[1, [COL[name] for name in ("nan", "norm", "max_norm", "nonfinite_steps")]])
    )
    assert row[0, COL["nan"]] == 0 and row[0, COL["norm"]] == 0


def test_producer_is_the_first_site_in_execution_order():
    sites = _sites("activation", "activation_grad", "weight_grad", "optimizer_state")
    first = host.row_from_accumulators(
        _contribution(4, 7, counts=[[0, 0, 0], [0, 2, 0], [1, 0, 0], [0, 0, 0]])
    )
    record = host.first_record(sites, first, consumers={"layer_1": ["layer_2"]})
    assert (record["site"], record["layer"], record["kind"], record["posinf"]) == (
        1,
        "layer_1",
        "activation_grad",
        2,
    )
    assert record["backward_of"] == ["layer_2"]
    assert [p["layer"] for p in record["propagators"]] == ["layer_2"]
    assert host.first_record(sites, host.row_from_accumulators(_contribution(4, 7))) is None


def test_replicas_and_worker_of_the_producer():
    record = {"site": 1}
    per_replica = np.array([[0, 0], [0, 1], [0, 1], [0, 0]])
    out = host.replicas_of(record, per_replica, ["chief_0", "worker_0"])
    assert out["replica"] == 1 and out["replicas"] == [1, 2] and out["worker"] == "chief_0"
    assert host.replicas_of(record, per_replica[:1]) is record


def test_flight_rows_are_ascending_and_end_at_the_first_step():
    n, ring_size = 2, 4
    ring_steps = np.array([4, 5, 2, 3])  # a ring that wrapped: slot = step % 4
    ring = np.zeros((ring_size, n, len(host.RING_STATS)))
    ring[:, :, host.RING_STATS.index("norm")] = ring_steps[:, None] * 10.0
    first_row = host.row_from_accumulators(_contribution(n, 5, counts=[[0, 1, 0], [0, 0, 0]]))
    steps, rows = host.flight_rows(ring_steps, ring, np.array([4.0, 4.0]), 5, first_row)
    assert steps == [2, 3, 4, 5]
    assert [r[0, COL["norm"]] for r in rows[:3]] == [20.0, 30.0, 40.0]
    assert all(r[0, COL["steps"]] == 1 for r in rows)
    assert rows[-1][0, COL["posinf"]] == 1 and rows[-1][0, COL["first_nonfinite_step"]] == 5


def test_loss_scale_is_divided_out_of_gradients_only():
    sites = _sites("activation", "weight_grad")
    row = host.row_from_accumulators(_contribution(2, 0, norm=8.0))
    out = host.unscale_gradients(row, sites, 4.0)
    assert (
        out[0, COL["norm"]] == 8.0 and out[1, COL["norm"]] == 2.0 and out[1, COL["max_norm"]] == 2.0
    )
    assert out[1, COL["nan"]] == row[1, COL["nan"]]
    assert host.unscale_gradients(row, sites, None) is row


@pytest.mark.parametrize(
    "steps_run,last_row,due",
    [(1, -1, True), (2, 0, False), (10, 0, True), (11, 9, False), (20, 9, True), (0, -1, False)],
)
def test_rows_end_at_step_zero_and_every_log_every(steps_run, last_row, due):
    assert host.row_due(steps_run, last_row, 10) is due


def test_rows_on_disk_take_64_bytes_per_site_and_read_back_exactly():
    n = 5
    row = host.row_from_accumulators(
        _contribution(n, 123456789, counts=[[0, 0, 0]] * 4 + [[3, 0, 0]], norm=1.5)
    )
    row[:, COL["steps"]] = 100
    encoded = metadata.encode_row(123456789, row)
    assert encoded.dtype == np.float32 and encoded.shape == (n + 1, 16)
    assert encoded[1:].nbytes / n == 64
    decoded = metadata.decode_rows(encoded[None], metadata.DISK_STATS, [123456789])[0]
    # The first non-finite step is exact although float32 cannot hold 123456789.
    assert decoded[4, COL["first_nonfinite_step"]] == 123456789
    assert float(np.float32(123456789)) != 123456789
    np.testing.assert_array_equal(decoded[:, COL["steps"]], 100)
    np.testing.assert_allclose(
        np.nan_to_num(decoded, nan=-7), np.nan_to_num(row, nan=-7), rtol=1e-7
    )


def _write_v1_run(logdir, sites, rows_by_step):
    """A run as protocol 1 wrote it: float64 rows of the 17 columns of that day's table."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    v1_stats = (
        "steps",
        "size",
        "nan",
        "posinf",
        "neginf",
        "nonfinite_steps",
        "first_nonfinite_step",
        "mean_every_step",
        "min",
        "max",
        "mean",
        "std",
        "max_abs",
        "norm",
        "zero_frac",
        "headroom",
        "underflow_frac",
    )
    content = {"version": 1, "record": "rows", "sites": sites, "stats": list(v1_stats)}
    writer = EventFileWriter(str(logdir))
    for i, (step, row) in enumerate(sorted(rows_by_step.items())):
        value = summary_pb2.Summary.Value(
            tag="nanwatch/rows", tensor=tensor_util.make_tensor_proto(row)
        )
        if i == 0:
            value.metadata.plugin_data.plugin_name = metadata.PLUGIN_NAME
            value.metadata.plugin_data.content = json.dumps(content).encode()
            value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
        writer.add_event(
            event_pb2.Event(
                step=step, wall_time=1.0 + i, summary=summary_pb2.Summary(value=[value])
            )
        )
    writer.close()
    return v1_stats


def test_protocol_1_runs_still_read(tmp_path):
    sites = _sites("activation", "weight")
    v1 = (
        "steps",
        "size",
        "nan",
        "posinf",
        "neginf",
        "nonfinite_steps",
        "first_nonfinite_step",
        "mean_every_step",
        "min",
        "max",
        "mean",
        "std",
        "max_abs",
        "norm",
        "zero_frac",
        "headroom",
        "underflow_frac",
    )
    rows = {}
    for step in (0, 9, 19):
        row = np.zeros((2, len(v1)))
        row[:, v1.index("steps")] = 1 if step == 0 else 10
        row[:, v1.index("size")] = 8
        row[:, v1.index("first_nonfinite_step")] = np.nan
        row[:, v1.index("norm")] = step + 1.0
        row[:, v1.index("max_abs")] = step + 0.5
        rows[step] = row
    rows[19][1, v1.index("nan")] = 2
    rows[19][1, v1.index("first_nonfinite_step")] = 15
    _write_v1_run(tmp_path / "old", sites, rows)
    provider, ctx, eid = reader.open_logdir(str(tmp_path))
    data = reader.read_run(provider, ctx, eid, "old")
    assert list(data.steps) == [0, 9, 19]
    assert list(data.rows[:, 0, COL["steps"]]) == [1, 10, 10]
    assert list(data.rows[:, 0, COL["norm"]]) == [1.0, 10.0, 20.0]
    assert data.rows[2, 1, COL["first_nonfinite_step"]] == 15 and data.rows[2, 1, COL["nan"]] == 2
    assert np.all(np.isnan(data.rows[:, :, COL["max_norm"]]))  # not measured by protocol 1
    assert reader.first_nonfinite_json(data)["step"] == 15


def test_values_past_float32_saturate_and_infinities_stay():
    row = np.full((2, len(stats.STATS)), np.nan)
    row[:, COL["steps"]] = 1
    row[:, COL["norm"]] = [1e300, 2.0]
    row[:, COL["headroom"]] = [np.inf, 3.0]  # all zeros: infinite headroom, on purpose
    with np.errstate(over="raise"):
        decoded = metadata.decode_rows(metadata.encode_row(5, row)[None], metadata.DISK_STATS, [5])[
            0
        ]
    assert decoded[0, COL["norm"]] == np.finfo(np.float32).max and decoded[1, COL["norm"]] == 2.0
    assert decoded[0, COL["headroom"]] == np.inf
