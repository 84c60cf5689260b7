"""Damaged and hostile logs: what is intact is read, what is not is named, nothing is lost.

The CLI runs in this process (`damage_helpers.run_cli`, as `main()`); the plugin through
TensorBoard's own WSGI app and its multiplexer provider (`plugin_helpers`-style).
"""

import json
import os
import struct
import time

import damage_helpers as dh
import numpy as np
import pytest
import synthetic
from tensorboard.util import tensor_util

from tb_nanwatch import eventfile, metadata, reader, runview, stats, summary, validation

PRODUCER = 5
FIRST = (33, PRODUCER, "nan")
SITES = synthetic.sites_for()


def _run_with_first(run_dir):
    # Every record in one event file, so a test can damage rows and the first record alike
    # (the row file is read by the same code).
    synthetic.write_run(str(run_dir), n_rows=12, log_every=5, first=FIRST, flight=4, row_file=False)
    return dh.only_event_file(run_dir)


def _first_of(out):
    (entry,) = json.loads(out)["runs"]
    return entry, entry["first_nonfinite"]


def _frames_of(path):
    frames, damaged = dh.frames(open(path, "rb").read())
    assert not damaged
    return frames


def _tag_of(frame):
    return dh.event_of(frame).summary.value[0].tag if dh.event_of(frame).summary.value else None


# -- framing ---------------------------------------------------------------------------
@pytest.mark.parametrize("tail", [b"\x00" * 16, b"\xff" * 16, bytes(range(16))])
def test_bytes_appended_after_the_first_record_lose_nothing(tmp_path, tail):
    path = _run_with_first(tmp_path / "r")
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(tail)
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 1, err
    entry, first = _first_of(out)
    assert (first["step"], first["layer"], first["kind"]) == (33, "dense_2", "activation_grad")
    assert "source" not in first  # the record itself, not the fallback from rows
    (warning,) = [w for w in entry["warnings"] if os.path.basename(path) in w]
    assert "at byte %d" % size in warning


def test_a_bad_payload_checksum_skips_one_record_and_reads_on(tmp_path):
    """TensorBoard stops silently at the bad record (the report used to end at step 19)."""
    path = _run_with_first(tmp_path / "r")
    frames = _frames_of(path)
    rows = [f for f in frames if _tag_of(f[2]) == "nanwatch/rows"]
    victim = rows[3]  # the row ending at step 19
    assert dh.event_of(victim[2]).step == 19
    data = bytearray(open(path, "rb").read())
    data[victim[1] - 1] ^= 0x01  # its data checksum
    open(path, "wb").write(bytes(data))
    provider, ctx, eid = reader.open_logdir(tmp_path)
    run = reader.read_run(provider, ctx, eid, "r")
    written = [dh.event_of(f[2]).step for f in rows]
    assert list(run.steps) == [s for s in written if s != 19]
    assert run.first_nonfinite["step"] == 33
    (damage,) = provider.damage["r"]
    assert "bad record data (checksum) at byte %d" % victim[0] in damage


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, 2**31])
def test_a_huge_length_field_is_damage_not_an_allocation(tmp_path, length):
    path = _run_with_first(tmp_path / "r")
    frames = _frames_of(path)
    data = bytearray(open(path, "rb").read())
    at = frames[5][0]
    header = struct.pack("<Q", length)
    data[at : at + 12] = header + struct.pack(
        "<I", eventfile.masked_crc32c(header)
    )  # a checksummed lie
    open(path, "wb").write(bytes(data))
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 1 and "Traceback" not in err
    entry, first = _first_of(out)
    assert first["step"] == 33 and "source" not in first  # frames after the lie were found again
    assert any(
        "claims %d bytes" % length in w and "at byte %d" % at in w for w in entry["warnings"]
    )


def test_a_truncated_file_reads_every_whole_record(tmp_path):
    path = _run_with_first(tmp_path / "r")
    frames = _frames_of(path)
    os.truncate(path, frames[-1][0] + 7)
    provider, ctx, eid = reader.open_logdir(tmp_path)
    run = reader.read_run(provider, ctx, eid, "r")
    assert len(run.steps) == sum(1 for f in frames[:-1] if _tag_of(f[2]) == "nanwatch/rows")
    assert "truncated: the last record is incomplete" in provider.damage["r"][0]


def test_an_incomplete_last_record_of_a_live_file_says_its_writer_may_be_writing(tmp_path):
    path = _run_with_first(tmp_path / "r")
    frames = _frames_of(path)
    os.truncate(path, frames[-1][0] + 7)
    (live,) = reader.open_logdir(tmp_path)[0].damage["r"]
    assert "its writer may still be writing it" in live
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # an hour old: a killed run
    (old,) = reader.open_logdir(tmp_path)[0].damage["r"]
    assert old.startswith(os.path.basename(path) + ": truncated") and "writing" not in old


def test_a_lost_first_row_record_takes_the_site_list_from_the_flight_recorder(tmp_path):
    """The first record of a tag carries its metadata; the rows after it are still read."""
    path = _run_with_first(tmp_path / "r")
    frames = _frames_of(path)
    first_row = next(f for f in frames if _tag_of(f[2]) == "nanwatch/rows")
    data = bytearray(open(path, "rb").read())
    data[first_row[0] + 20] ^= 0x40
    open(path, "wb").write(bytes(data))
    run = reader.read_run(*reader.open_logdir(tmp_path), "r")
    assert len(run.steps) == 11 and run.steps[0] == 9 and len(run.sites) == len(SITES)
    # Read as the tab and the CLI read it (a piece at a time): the rows before the flight
    # recorder's site list wait for it.
    view = runview.from_files("r", str(tmp_path / "r"))
    assert list(view.steps) == list(run.steps) and len(view.sites) == len(SITES)


def test_zero_filled_tail_is_scanned_quickly(tmp_path):
    """A crash can leave megabytes of zeros; resynchronisation must not crawl over them."""
    path = _run_with_first(tmp_path / "r")
    with open(path, "ab") as f:
        f.write(bytes(8 << 20))
    start = time.perf_counter()
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 1
    # Measured ~1 s for 8 MB on this 2-core machine; a byte-at-a-time scan takes ~20 s.
    assert time.perf_counter() - start < 10


# -- logdir walking ----------------------------------------------------------------------
def test_symlink_loops_list_each_run_once(tmp_path):
    _run_with_first(tmp_path / "r")
    os.symlink(".", tmp_path / "self")
    os.symlink("..", tmp_path / "r" / "up")
    os.symlink(str(tmp_path / "r"), tmp_path / "also_r")
    assert list(eventfile.find_runs(str(tmp_path))) == ["r"]
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 1
    assert [e["run"] for e in json.loads(out)["runs"]] == ["r"]


def test_a_run_reached_only_through_a_link_is_listed(tmp_path):
    _run_with_first(tmp_path / "elsewhere" / "r")
    os.mkdir(tmp_path / "logs")
    os.symlink(str(tmp_path / "elsewhere" / "r"), tmp_path / "logs" / "linked")
    assert list(eventfile.find_runs(str(tmp_path / "logs"))) == ["linked"]


# -- nothing lost ---------------------------------------------------------------------
def _only_first_record(run_dir):
    writer = summary.RecordWriter(str(run_dir), SITES, log_every=100)
    writer.write_first_nonfinite(
        3,
        dict(
            layer="dense",
            kind="weight_grad",
            tensor="kernel",
            nan=2,
            posinf=0,
            neginf=0,
            propagators=[],
        ),
    )
    writer.close()


def test_a_run_with_only_its_first_record_is_listed_and_reported(tmp_path):
    _only_first_record(tmp_path / "killed")
    provider, ctx, eid = reader.open_logdir(tmp_path)
    assert reader.list_runs(provider, ctx, eid) == {"killed": [None]}
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 1, err
    _, first = _first_of(out)
    assert (first["step"], first["layer"], first["kind"], first["nan"]) == (
        3,
        "dense",
        "weight_grad",
        2,
    )
    rc, out, err = dh.run_cli(tmp_path)
    assert (
        rc == 1
        and "first non-finite value at step 3" in out
        and "dense, weight gradient kernel" in out
    )
    rc, _, err = dh.run_cli(tmp_path, "--png", tmp_path / "k.png")
    assert rc == 1 and "Traceback" not in err


def test_the_plugin_serves_a_run_with_only_its_first_record(tmp_path):
    from test_plugin_backend import App

    _only_first_record(tmp_path / "killed")
    app = App(tmp_path)
    assert app.json("/runs") == ["killed"]
    assert app.json("/first_nonfinite", run="killed")["layer"] == "dense"
    hm = app.json("/heatmap", run="killed")
    assert hm["n_sites"] == 0 and hm["n_columns"] == 0


# -- the gate -----------------------------------------------------------------------------
ROWS_TAG = metadata.tag(metadata.ROWS)
FIRST_TAG = metadata.tag(metadata.FIRST_NONFINITE)
EVENTS_TAG = metadata.tag(metadata.EVENTS)


def _row(step=0):
    return tensor_util.make_tensor_proto(synthetic.finite_row(len(SITES), step))


def _hostile_run(run_dir, extra, rows_content=None):
    """Three good rows (steps 0-2) under `rows_content`, then the `extra` values."""
    content = rows_content if rows_content is not None else dh.rows_content(SITES)
    values = [
        (0, dh.value(ROWS_TAG, _row(0), content)),
        (1, dh.value(ROWS_TAG, _row(1))),
        (2, dh.value(ROWS_TAG, _row(2))),
    ]
    dh.write_events(run_dir, values + list(extra))


BAD_FIRST_RECORDS = {
    "empty object": "{}",
    "null": "null",
    "a number for the layer": json.dumps({"layer": 0, "kind": "activation", "step": 3}),
    "a count that is a string": json.dumps({"layer": "d", "kind": "loss", "nan": "many"}),
    "nested 100,000 deep": "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("case", sorted(BAD_FIRST_RECORDS))
def test_a_bad_first_record_is_dropped_and_named_and_text_and_json_agree(tmp_path, case):
    _hostile_run(
        tmp_path / "r",
        [
            (
                7,
                dh.value(
                    FIRST_TAG,
                    dh.string_tensor(BAD_FIRST_RECORDS[case]),
                    {"version": 1, "record": "first_nonfinite"},
                ),
            )
        ],
    )
    rc_json, out, err = dh.run_cli(tmp_path, "--json")
    rc_text, text, err_text = dh.run_cli(tmp_path)
    assert rc_json == rc_text == 0
    entry, first = _first_of(out)
    assert first is None
    (warning,) = entry["warnings"]
    assert "tag %s: record at step 7 dropped" % FIRST_TAG in warning
    assert warning in err and warning in err_text
    assert "run r: finite: no NaN or Inf in the 3 steps" in text


def test_a_good_first_record_keeps_its_producer_when_a_propagator_is_bad(tmp_path):
    record = {
        "layer": "dense",
        "kind": "activation",
        "step": 3,
        "nan": 1,
        "propagators": [{"layer": 5, "kind": "loss"}, {"layer": "", "kind": "loss", "nan": 1}],
    }
    _hostile_run(
        tmp_path / "r",
        [
            (
                3,
                dh.value(
                    FIRST_TAG,
                    dh.string_tensor(json.dumps(record)),
                    {"version": 1, "record": "first_nonfinite"},
                ),
            )
        ],
    )
    rc, out, _ = dh.run_cli(tmp_path, "--json")
    _, first = _first_of(out)
    assert (
        rc == 1
        and first["layer"] == "dense"
        and [p["kind"] for p in first["propagators"]] == ["loss"]
    )


def _matrix(values):
    return tensor_util.make_tensor_proto(np.asarray(values))


BAD_ROWS = {
    "16 instead of 17 columns": lambda: _matrix(synthetic.finite_row(len(SITES), 5)[:, :-1]),
    "all +Inf": lambda: _matrix(np.full((len(SITES), len(stats.STATS)), np.inf)),
    "strings": lambda: dh.string_tensor(
        np.array([["x"] * len(stats.STATS)] * len(SITES), dtype=object)
    ),
    "a negative NaN count": lambda: _matrix(
        np.where(
            np.arange(len(stats.STATS)) == stats.STAT_INDEX["nan"],
            -3.0,
            synthetic.finite_row(len(SITES), 5),
        )
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_dropped_and_named(tmp_path, case):
    _hostile_run(
        tmp_path / "r",
        [(5, dh.value(ROWS_TAG, BAD_ROWS[case]())), (6, dh.value(ROWS_TAG, _row(6)))],
    )
    run = reader.read_run(*reader.open_logdir(tmp_path), "r")
    assert list(run.steps) == [0, 1, 2, 6]
    (warning,) = run.warnings
    assert warning.startswith("tag %s: record at step 5 dropped" % ROWS_TAG)


def test_a_tensor_buffer_that_does_not_fit_its_dtype_is_dropped(tmp_path):
    proto = _row(5)
    proto.tensor_content = proto.tensor_content[
        :-3
    ]  # "buffer size must be a multiple of element size"
    _hostile_run(tmp_path / "r", [(5, dh.value(ROWS_TAG, proto))])
    provider, ctx, eid = reader.open_logdir(tmp_path)
    assert list(reader.read_run(provider, ctx, eid, "r").steps) == [0, 1, 2]
    assert "tag %s step 5: tensor cannot be decoded" % ROWS_TAG in provider.damage["r"][0]


def test_a_tensor_claiming_2_to_the_40_elements_is_refused(tmp_path):
    proto = tensor_util.make_tensor_proto(np.float64(1.0))
    proto.tensor_shape.dim.add().size = 2**20
    proto.tensor_shape.dim.add().size = 2**20
    proto.ClearField("tensor_content")
    proto.double_val.append(1.0)
    _hostile_run(tmp_path / "r", [(5, dh.value(ROWS_TAG, proto))])
    provider, ctx, eid = reader.open_logdir(tmp_path)
    assert list(reader.read_run(provider, ctx, eid, "r").steps) == [0, 1, 2]
    assert "tensor shape [1048576, 1048576] refused" in provider.damage["r"][0]


BAD_METADATA = {
    "version as a string": dh.rows_content(SITES, version="1"),
    "version null": dh.rows_content(SITES, version=None),
    "sites null": dh.rows_content(SITES, sites=None),
    "a site without a layer": dh.rows_content([{"kind": "activation"}] + SITES[1:]),
    "a site of an unknown kind": dh.rows_content([dict(SITES[0], kind="bogus")] + SITES[1:]),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_named_by_cli_and_answered_422_by_the_plugin(tmp_path, case):
    from test_plugin_backend import App

    _hostile_run(tmp_path / "r", [], rows_content=BAD_METADATA[case])
    rc, out, err = dh.run_cli(tmp_path, "--json")
    assert rc == 2 and "Traceback" not in err
    (entry,) = json.loads(out)["runs"]
    assert "tag %s: metadata dropped" % ROWS_TAG in entry["error"]
    app = App(tmp_path)
    for route in ("/heatmap", "/first_nonfinite", "/cell?site=0&", "/precursors"):
        path, _, query = route.partition("?")
        r = app.client.get("/data/plugin/nanwatch" + path + "?" + query + "run=r")
        assert r.status_code == 422, (route, r.status_code, r.get_data())
        assert "metadata dropped" in json.loads(r.get_data())["error"]


def test_bad_events_are_dropped_one_by_one(tmp_path):
    events = [
        {"type": "loss_scale_skip", "step": 4, "loss_scale": 2.0},
        {"type": "x", "step": float("nan")},
        None,
        {"step": 5},
    ]
    _hostile_run(
        tmp_path / "r",
        [
            (
                4,
                dh.value(
                    EVENTS_TAG,
                    dh.string_tensor(json.dumps(events)),
                    {"version": 1, "record": "events"},
                ),
            ),
            (5, dh.value(EVENTS_TAG, dh.string_tensor("null"))),
        ],
    )
    run = reader.read_run(*reader.open_logdir(tmp_path), "r")
    assert run.events == [events[0]]
    (warning,) = run.warnings
    assert (
        "step 4 dropped (3 events without a type or with a bad step); and 1 more (steps 5)"
        in warning
    )


def test_a_failing_data_provider_is_still_503(tmp_path):
    from test_plugin_backend import App

    _hostile_run(tmp_path / "r", [])
    app = App(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("connection to the data server lost")

    app.plugin._provider.list_tensors = broken
    r = app.get("/heatmap", run="r")
    assert (
        r.status_code == 503
        and "connection to the data server lost" in json.loads(r.get_data())["error"]
    )


# -- the gate's pieces, as plain functions -----------------------------------------------
def test_row_problems_name_the_column():
    rows = np.stack([synthetic.finite_row(3, s) for s in (10, 11, 12, 13)])
    rows[1, 2, stats.STAT_INDEX["posinf"]] = 0.5
    rows[2, 0, stats.STAT_INDEX["steps"]] = 14  # more steps than there were up to step 12
    rows[3, 1, stats.STAT_INDEX["first_nonfinite_step"]] = 99
    problems = validation.row_problems(np.array([10, 11, 12, 13]), rows)
    assert problems[0] is None
    assert (
        "posinf" in problems[1] and "steps" in problems[2] and "first_nonfinite_step" in problems[3]
    )


def test_matrix_problem():
    assert validation.matrix_problem(np.zeros((3, 4)), 3, 4) is None
    assert "shape [3, 5]" in validation.matrix_problem(np.zeros((3, 5)), 3, 4)
    assert "object" in validation.matrix_problem(np.zeros((3, 4), dtype=object), 3, 4)
    assert "complex" in validation.matrix_problem(np.zeros((3, 4), dtype=complex), 3, 4)


@pytest.mark.parametrize(
    "bad", ["malformed row at a later step", "valid row at step 2**62", "step -2**63"]
)
def test_one_hostile_record_does_not_pass_for_a_second_writer_session(tmp_path, bad):
    """Rows whose steps go back start a new writer session (a re-run), and the reader shows the
    latest only; one record the gate drops must not split the run and hide what came before."""
    row, step = {
        "malformed row at a later step": (BAD_ROWS["16 instead of 17 columns"](), 50),
        "valid row at step 2**62": (_row(5), 2**62),
        "step -2**63": (_row(5), -(2**63)),
    }[bad]
    _hostile_run(
        tmp_path / "r",
        [
            (step, dh.value(ROWS_TAG, row)),
            (3, dh.value(ROWS_TAG, _row(3))),
            (4, dh.value(ROWS_TAG, _row(4))),
        ],
    )
    run = reader.read_run(*reader.open_logdir(tmp_path), "r")
    assert list(run.steps) == [0, 1, 2, 3, 4]
    assert run.session_warning() is None
    (warning,) = run.warnings
    assert "record at step %d dropped" % step in warning
