"""A seeded, bounded fuzz of damaged and hostile logdirs (a few hundred cases, well under a minute).

Base runs are written with `summary.RecordWriter` (no training).  Each case copies one
base event file, damages it, and puts it beside an untouched healthy run:

* framing: truncation, bit flips, checksummed and unchecksummed huge length fields, bad
  length/data checksums, garbage appended or inserted, zeroed regions, other plugins'
  records inserted, records duplicated or dropped, two of these at once;
* content (well-framed records with malformed nanwatch content): rows of the wrong shape,
  dtype or range, undecodable or oversized tensors, bad metadata, bad first-non-finite
  records and events, hostile event steps.

Per case: `tb-nanwatch report --json` and the text report (in this process, with
TB_NANWATCH_DEBUG set so that an internal error raises), the reader, and for content
cases every plugin route through TensorBoard's WSGI app and its multiplexer.  Figures:

* internal errors: an exception out of the CLI, the reader or a route;
* lost records: an intact record (its frame still in the file, byte for byte) that the
  reader did not return: rows and flight rows by step, the first-non-finite record
  reported as the record (not the fallback from rows), events;
* silent damage: a file whose framing is broken (the test's own strict walk says so)
  without a warning naming it;
* 5xx: plugin answers of 500 or more.
"""

import collections
import json
import os
import random
import shutil
import struct
import time
import traceback
import urllib.parse

import damage_helpers as dh
import numpy as np
import pytest
import synthetic
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.util import tensor_util

from tb_nanwatch import metadata, reader, stats

SEED = 20261201
N_FRAMING = 200
N_CONTENT = 100
SITES = synthetic.sites_for(("d0", "d1"))
N = len(SITES)
ROWS, FLIGHT, FIRST, EVENTS = (
    metadata.tag(r)
    for r in (metadata.ROWS, metadata.FLIGHT, metadata.FIRST_NONFINITE, metadata.EVENTS)
)
META_RECORD = {ROWS: "rows", FLIGHT: "flight", FIRST: "first_nonfinite", EVENTS: "events"}


def _event_frame(step, value, wall_time):
    event = event_pb2.Event(
        step=step, wall_time=wall_time, summary=summary_pb2.Summary(value=[value])
    )
    return dh.frame(event.SerializeToString())


def _write_base(run_dir, blowup):
    """8 rows every 5 steps and an events record; with `blowup`, site 3 goes NaN at step 23
    (flight recorder, first-non-finite record).  One event file; its bytes."""
    synthetic.write_run(
        str(run_dir),
        n_rows=8,
        log_every=5,
        sites=SITES,
        flight=4,
        first=(23, 3, "nan") if blowup else None,
    )
    path = dh.only_event_file(run_dir)
    skips = [{"type": "loss_scale_skip", "step": 12, "loss_scale": 2.0, "skips_total": 1}]
    events = dh.value(
        EVENTS, dh.string_tensor(json.dumps(skips)), {"version": 1, "record": "events"}
    )
    last_wall_time = dh.event_of(dh.frames(open(path, "rb").read())[0][-1][2]).wall_time
    with open(path, "ab") as f:
        f.write(_event_frame(12, events, last_wall_time))
    data = open(path, "rb").read()
    shutil.rmtree(run_dir)
    return data


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_bases")
    return {
        "blowup": _write_base(root / "blowup", True),
        "finite": _write_base(root / "finite", False),
    }


# -- framing mutations -------------------------------------------------------------------
def _random_frame(rng, frames):
    return frames[rng.randrange(len(frames))]


def m_truncate(rng, data, frames):
    return data[: rng.randrange(len(data))]


def m_bitflip(rng, data, frames):
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_huge_length(rng, data, frames):
    offset = _random_frame(rng, frames)[0]
    length = rng.choice([2**62, 2**64 - 1, 2**63, 2**32 + 7, len(data) * 2, len(data) - offset])
    header = struct.pack("<Q", length)
    crc = (
        struct.pack("<I", dh.masked_crc32c(header))
        if rng.random() < 0.7
        else data[offset + 8 : offset + 12]
    )
    return data[:offset] + header + crc + data[offset + 12 :]


def m_bad_data_crc(rng, data, frames):
    end = _random_frame(rng, frames)[1]
    return data[: end - 4] + bytes(b ^ 0x5A for b in data[end - 4 : end]) + data[end:]


def m_bad_length_crc(rng, data, frames):
    offset = _random_frame(rng, frames)[0]
    return (
        data[: offset + 8]
        + bytes(b ^ 0xA5 for b in data[offset + 8 : offset + 12])
        + data[offset + 12 :]
    )


def m_append_garbage(rng, data, frames):
    n = rng.choice([16, 1, 7, 12, 200, 5000])
    return data + bytes(rng.getrandbits(8) for _ in range(n))


def m_insert_garbage(rng, data, frames):
    at = _random_frame(rng, frames)[0]
    return data[:at] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) + data[at:]


def m_zero_region(rng, data, frames):
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 4000))
    return data[:start] + bytes(end - start) + data[end:]


def m_other_plugins(rng, data, frames):
    """Well-framed records of other plugins (not damage): a scalar, an image-like tensor,
    and a record of another plugin under a nanwatch-looking tag."""
    scalar = summary_pb2.Summary.Value(tag="loss", simple_value=0.5)
    other = summary_pb2.Summary.Value(
        tag="images/x", tensor=tensor_util.make_tensor_proto(np.zeros((2, 2)))
    )
    other.metadata.plugin_data.plugin_name = "images"
    hijack = summary_pb2.Summary.Value(
        tag="nanwatch/d9/rows", tensor=tensor_util.make_tensor_proto(np.ones(3))
    )
    hijack.metadata.plugin_data.plugin_name = "scalars"
    at_frame = _random_frame(rng, frames)
    wall_time = dh.event_of(at_frame[2]).wall_time
    extra = b"".join(
        _event_frame(rng.randint(0, 50), v, wall_time) for v in (scalar, other, hijack)
    )
    at = at_frame[1]
    return data[:at] + extra + data[at:]


def m_duplicate(rng, data, frames):
    offset, end, _ = _random_frame(rng, frames)
    return data[:end] + data[offset:end] + data[end:]


def m_drop(rng, data, frames):
    offset, end, _ = _random_frame(rng, frames[1:])
    return data[:offset] + data[end:]


FRAMING = [
    m_truncate,
    m_bitflip,
    m_huge_length,
    m_bad_data_crc,
    m_bad_length_crc,
    m_append_garbage,
    m_insert_garbage,
    m_zero_region,
    m_other_plugins,
    m_duplicate,
    m_drop,
]


# -- content mutations: (tag to hit, value maker) ------------------------------------------
def _row_tensor(values):
    return tensor_util.make_tensor_proto(np.asarray(values))


def _good_row(step=0):
    return synthetic.finite_row(N, step)


def _with_col(name, value):
    row = _good_row()
    row[:, stats.STAT_INDEX[name]] = value
    return _row_tensor(row)


def _bad_buffer():
    proto = _row_tensor(_good_row())
    proto.tensor_content = proto.tensor_content[:-3]
    return proto


def _huge_shape():
    proto = tensor_util.make_tensor_proto(np.float64(1.0))
    for _ in range(2):
        proto.tensor_shape.dim.add().size = 2**20
    proto.ClearField("tensor_content")
    proto.double_val.append(1.0)
    return proto


def _deep(n=100000):
    return "[" * n + "]" * n


ROW_TENSORS = [
    lambda: _row_tensor(_good_row()[:, :-1]),  # 16 instead of 17 columns
    lambda: _row_tensor(_good_row()[:-1]),  # one site short
    lambda: _row_tensor(np.full((N, len(stats.STATS)), np.inf)),
    lambda: _row_tensor(np.full((N, len(stats.STATS)), np.nan)),
    lambda: dh.string_tensor(np.array([["1"] * len(stats.STATS)] * N, dtype=object)),
    lambda: _row_tensor(np.float64(3.0)),
    lambda: _row_tensor(np.zeros((N, len(stats.STATS), 2))),
    lambda: _with_col("nan", -1),
    lambda: _with_col("posinf", 0.5),
    lambda: _with_col("steps", 1e30),
    lambda: _with_col("first_nonfinite_step", 1e300),
    lambda: _with_col("size", np.inf),
    lambda: _row_tensor(_good_row().astype(np.float16)),  # a valid other dtype
    lambda: _row_tensor(np.zeros((N, len(stats.STATS)), dtype=np.int64)),
    lambda: _row_tensor(np.zeros((N, len(stats.STATS)), dtype=np.complex64)),
    _bad_buffer,
    _huge_shape,
]

BAD_CONTENT = [
    b"not json",
    b"null",
    b"[]",
    b"\xff\xfe",
    json.dumps({"version": "1", "record": "rows"}).encode(),
    json.dumps({"version": None, "record": "rows"}).encode(),
    json.dumps({"version": 99, "record": "rows"}).encode(),
    json.dumps(dh.rows_content(SITES, sites=None)).encode(),
    json.dumps(dh.rows_content([1, 2])).encode(),
    json.dumps(dh.rows_content([{"kind": "activation"}] * N)).encode(),
    json.dumps(dh.rows_content(SITES, stats=None)).encode(),
    json.dumps(dh.rows_content(SITES, stats=["nan", "nan"])).encode(),
    json.dumps(
        dh.rows_content(SITES, stats=list(stats.STAT_NAMES[:-1]))
    ).encode(),  # fewer columns than rows
    _deep().encode(),
]

FIRST_RECORDS = [
    "{}",
    "null",
    "[]",
    "3",
    '"x"',
    _deep(),
    json.dumps({"layer": 0, "kind": "loss"}),
    json.dumps({"layer": "d0", "kind": "nope", "step": 3}),
    json.dumps({"layer": "d0", "kind": "activation", "step": -1}),
    json.dumps({"layer": "d0", "kind": "activation", "step": "x"}),
    json.dumps({"layer": "d0", "kind": "activation", "step": float("nan")}),
    json.dumps({"layer": "d0", "kind": "activation", "step": 5, "nan": float("inf")}),
    json.dumps({"layer": "d0", "kind": "activation", "step": 5, "propagators": "x"}),
    json.dumps(
        {"layer": "d0", "kind": "activation", "step": 5, "propagators": [None, {"kind": 3}]}
    ),
    json.dumps({"layer": "d0", "kind": "activation", "step": 5, "site": 10**9}),
    json.dumps({"layer": "d0", "kind": "activation", "step": 2**70}),
    json.dumps({"layer": "d0", "kind": "activation", "step": 50, "backward_of": 3}),
]

EVENT_RECORDS = [
    "null",
    "{}",
    "[1]",
    '[{"type": 1}]',
    '[{"type": "x", "step": NaN}]',
    '[{"type": "x", "step": -4}]',
    '[{"type": "loss_scale_skip", "step": 3, "skips_total": "many", "loss_scale": Infinity}]',
    _deep(),
    '[{"type": "x", "step": 1e300}]',
    '[{"type": "loss_scale_skip", "step": 3, "loss_scale": "big"}]',
]


def c_row(rng, step):
    return ROWS, rng.choice(ROW_TENSORS)(), None


def c_flight(rng, step):
    return FLIGHT, rng.choice(ROW_TENSORS)(), None


def c_metadata(rng, step):
    return rng.choice([ROWS, FLIGHT]), _row_tensor(_good_row(step)), rng.choice(BAD_CONTENT)


def c_first(rng, step):
    return (
        FIRST,
        dh.string_tensor(rng.choice(FIRST_RECORDS)),
        b'{"version": 1, "record": "first_nonfinite"}',
    )


def c_first_not_a_string(rng, step):
    return FIRST, _row_tensor(np.arange(rng.choice([1, 3]), dtype=np.float64)), None


def c_events(rng, step):
    return EVENTS, dh.string_tensor(rng.choice(EVENT_RECORDS)), None


CONTENT = [c_row, c_flight, c_metadata, c_first, c_first_not_a_string, c_events]


def content_mutation(rng, data, frames):
    """Replace one nanwatch record (or add one) with malformed content, well-framed; now and
    then give it a hostile event step.  Returns (bytes, replaced frame or None, words)."""
    kind = rng.choice(CONTENT)
    target_tag, tensor, content = kind(rng, 0)
    tagged = [f for f in frames if _tag(f) == target_tag]
    victim = rng.choice(tagged) if tagged and rng.random() < 0.7 else None
    # An added record takes the step of the record before it (a writer writes in step
    # order; a valid record at an earlier step would stand for a re-run, see sessions_of).
    after = rng.choice(frames)
    step = dh.event_of((victim or after)[2]).step
    if rng.random() < 0.1:
        step = rng.choice([-5, 2**62, -(2**63)])
    value = summary_pb2.Summary.Value(tag=target_tag, tensor=tensor)
    carries_metadata = victim is not None and dh.event_of(victim[2]).summary.value[0].HasField(
        "metadata"
    )
    if content is not None or carries_metadata:
        value.metadata.plugin_data.plugin_name = metadata.PLUGIN_NAME
        value.metadata.plugin_data.content = (
            content
            if content is not None
            else (dh.event_of(victim[2]).summary.value[0].metadata.plugin_data.content)
        )
        value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    # The wall time of the record replaced or followed: a writer's own clock, so that only
    # the content is hostile (a record from 1970 would stand for another writer session).
    if victim is None:
        new = _event_frame(step, value, dh.event_of(after[2]).wall_time)
        at = after[1]
        return data[:at] + new + data[at:], None, "%s added at step %d" % (kind.__name__, step)
    new = _event_frame(step, value, dh.event_of(victim[2]).wall_time)
    return (
        data[: victim[0]] + new + data[victim[1] :],
        victim,
        "%s replacing step %d with step %d" % (kind.__name__, dh.event_of(victim[2]).step, step),
    )


def _tag(f):
    event = dh.event_of(f[2])
    return event.summary.value[0].tag if event.HasField("summary") and event.summary.value else None


# -- the oracle ----------------------------------------------------------------------
def _expected(base_frames, mutated):
    """What must be read from `mutated`: intact (byte-for-byte present) base frames by tag."""
    intact = [f for f in base_frames if f[2] in mutated]
    by_tag = collections.defaultdict(list)
    for f in intact:
        by_tag[_tag(f)].append(dh.event_of(f[2]).step)
    # Rows can be interpreted only while some record carrying the site list is intact.
    carriers = [
        f
        for f in base_frames
        if _tag(f) in (ROWS, FLIGHT) and dh.event_of(f[2]).summary.value[0].HasField("metadata")
    ]
    return by_tag, any(f in intact for f in carriers)


ROUTES = [
    "/runs",
    "/groups",
    "/heatmap?run={run}",
    "/heatmap?run={run}&source=flight&stat=nan",
    "/first_nonfinite?run={run}",
    "/precursors?run={run}",
    "/cell?run={run}&site=0",
    "/cell?run={run}&site=0&source=flight",
]


def test_fuzz(bases, tmp_path, monkeypatch):
    from test_plugin_backend import App

    monkeypatch.setenv("TB_NANWATCH_DEBUG", "1")
    rng = random.Random(SEED)
    figures = collections.Counter()
    examples = collections.defaultdict(list)
    cases = [("framing", i) for i in range(N_FRAMING)] + [("content", i) for i in range(N_CONTENT)]
    for n, (family, _) in enumerate(cases):
        base_name = rng.choice(sorted(bases))
        data = bases[base_name]
        base_frames, _ = dh.frames(data)
        replaced = None
        if family == "framing":
            mutations = [rng.choice(FRAMING) for _ in range(2 if rng.random() < 0.15 else 1)]
            mutated = data
            for mutation in mutations:
                frames_now, broken = dh.frames(mutated)
                mutated = mutation(
                    rng, mutated, frames_now if frames_now and not broken else base_frames
                )
            what = "+".join(m.__name__ for m in mutations)
        else:
            mutated, replaced, what = content_mutation(rng, data, base_frames)
        case_dir = tmp_path / ("case%03d" % n)
        os.makedirs(case_dir / "run")
        os.makedirs(case_dir / "ok")
        name = "events.out.tfevents.1.fuzz.%d" % n
        (case_dir / "run" / name).write_bytes(mutated)
        (case_dir / "ok" / "events.out.tfevents.1.fuzz.ok").write_bytes(bases["finite"])
        label = "case %d (%s, %s)" % (n, base_name, what)
        figures["cases"] += 1

        try:
            rc, out, err = dh.run_cli(case_dir, "--json")
            rc_text, text, err_text = dh.run_cli(case_dir)
            provider, ctx, eid = reader.open_logdir(str(case_dir))
            listed = reader.list_runs(provider, ctx, eid)
            run = None
            if "run" in listed:
                try:
                    run = reader.read_run(provider, ctx, eid, "run")
                except (reader.InvalidData, metadata.MetadataError):
                    pass
        except Exception:
            figures["internal errors"] += 1
            examples["internal errors"].append("%s: %s" % (label, traceback.format_exc()[-600:]))
            continue
        entries = {e["run"]: e for e in json.loads(out)["runs"]}

        # The healthy neighbour is never touched by its neighbour's damage.
        ok = entries.get("ok")
        if ok is None or ok["first_nonfinite"] is not None or ok.get("warnings"):
            figures["healthy run harmed"] += 1
            examples["healthy run harmed"].append(label)
        if rc not in (0, 1, 2) or rc != rc_text:
            figures["exit status disagrees"] += 1
            examples["exit status disagrees"].append("%s: json %s, text %s" % (label, rc, rc_text))

        # Nothing intact is lost.
        by_tag, sites_known = _expected(base_frames, mutated)
        if replaced is not None:
            by_tag[_tag(replaced)] = [s for s in by_tag[_tag(replaced)]]
        lost = []
        got_rows = set() if run is None else set(int(s) for s in run.steps)
        got_flight = set() if run is None else set(int(s) for s in run.flight_steps)
        if sites_known:
            lost += ["row %d" % s for s in by_tag.get(ROWS, []) if s not in got_rows]
            lost += ["flight row %d" % s for s in by_tag.get(FLIGHT, []) if s not in got_flight]
        if by_tag.get(FIRST):
            first = (entries.get("run") or {}).get("first_nonfinite")
            # (A hostile but valid record of an earlier step may come first.)
            if not first or first.get("source") == "rows" or first["step"] > 23:
                lost.append("first-non-finite record")
        if by_tag.get(EVENTS) and (
            run is None or not any(e.get("loss_scale") == 2.0 for e in run.events)
        ):
            lost.append("events")
        if lost:
            figures["lost records"] += len(lost)
            examples["lost records"].append("%s: %s" % (label, ", ".join(lost)))

        # Every damaged file is named.
        warnings = err + err_text
        if family == "framing" and dh.frames(mutated)[1]:
            figures["damaged files"] += 1
            if name not in err:
                figures["silent damage"] += 1
                examples["silent damage"].append(label)
        figures["intact records required"] += sum(len(v) for v in by_tag.values())
        if family == "content" and replaced is not None and "nanwatch" in (_tag(replaced) or ""):
            damaged_tag = _tag(replaced)
            hit = "tag %s" % damaged_tag in warnings or name in warnings
            if not hit and not _content_was_harmless(run, replaced, mutated):
                figures["silent bad content"] += 1
                examples["silent bad content"].append(label)

        if family == "content":
            try:
                app = App(case_dir)
                for route in ROUTES:
                    path = "/data/plugin/nanwatch" + route.format(run="run")
                    r = app.client.get(path)
                    figures["plugin requests"] += 1
                    body = r.get_data(as_text=True)
                    json.loads(body)
                    if r.status_code >= 500:
                        figures["5xx"] += 1
                        examples["5xx"].append(
                            "%s %s: %d %s" % (label, route, r.status_code, body[:200])
                        )
            except Exception:
                figures["internal errors"] += 1
                examples["internal errors"].append(
                    "%s plugin: %s" % (label, traceback.format_exc()[-600:])
                )

    print(
        "\nfuzz (seed %d): %s" % (SEED, ", ".join("%s %d" % kv for kv in sorted(figures.items())))
    )
    for key, found in examples.items():
        print("  %s (%d), e.g.:\n    %s" % (key, len(found), "\n    ".join(found[:5])))
    assert figures["cases"] == N_FRAMING + N_CONTENT
    bad = {
        k: figures[k]
        for k in (
            "internal errors",
            "lost records",
            "silent damage",
            "silent bad content",
            "5xx",
            "healthy run harmed",
            "exit status disagrees",
        )
        if figures[k]
    }
    assert not bad, (bad, dict(examples))


def _content_was_harmless(run, replaced, mutated):
    """A replaced record whose new content is in fact valid (e.g. a float16 row) needs no
    warning: it must then have been read."""
    if run is None:
        return False
    step = dh.event_of(replaced[2]).step
    tag = _tag(replaced)
    now = [f for f in dh.frames(mutated)[0] if f[0] == replaced[0]]
    if tag == EVENTS and now:
        # Well-formed events (a type, a whole step, numbers where the report computes) are
        # shown as written, odd values and all.
        try:
            written = json.loads(dh.event_of(now[0][2]).summary.value[0].tensor.string_val[0])
        except (ValueError, RecursionError):
            return False
        return isinstance(written, list) and 0 < len(written) == len(
            [e for e in run.events if e in written]
        )
    return (tag == ROWS and step in set(run.steps)) or (
        tag == FLIGHT and step in set(run.flight_steps)
    )


N_RUSTBOARD = 30


def test_fuzz_plugin_under_rustboard(bases, tmp_path):
    """The content cases again, as 30 runs of one logdir served by a real TensorBoard with
    its default loader (RustBoard): every route of every run answers JSON, none 5xx."""
    import plugin_helpers

    rng = random.Random(SEED + 1)
    logdir = tmp_path / "logs"
    for n in range(N_RUSTBOARD):
        data = bases[rng.choice(sorted(bases))]
        mutated, _, _ = content_mutation(rng, data, dh.frames(data)[0])
        os.makedirs(logdir / ("r%02d" % n))
        (logdir / ("r%02d" % n) / ("events.out.tfevents.1.fuzz.%d" % n)).write_bytes(mutated)
    figures = collections.Counter()
    bad = []
    with plugin_helpers.tensorboard(logdir) as base:
        prefix = base + "/data/plugin/nanwatch"
        runs = []
        deadline = time.monotonic() + 90
        while len(runs) < N_RUSTBOARD and time.monotonic() < deadline:
            status, body = plugin_helpers.get(prefix + "/runs")
            runs = json.loads(body) if status == 200 else []
            time.sleep(0.5)
        assert len(runs) == N_RUSTBOARD, runs  # every run has nanwatch records left
        for run in runs:
            for route in ROUTES:
                status, body = plugin_helpers.get(
                    prefix + route.format(run=urllib.parse.quote(run))
                )
                figures["requests"] += 1
                figures[status] += 1
                answer = json.loads(body)
                if route.startswith("/heatmap") and status == 200 and answer.get("warnings"):
                    figures["heatmaps naming dropped records"] += 1
                if status >= 500:
                    bad.append((run, route, status, body[:200]))
    print("\nrustboard fuzz (seed %d): %s" % (SEED + 1, dict(figures)))
    assert not bad, bad
    assert (
        figures["heatmaps naming dropped records"] > 10
    )  # the gate saw the damage through RustBoard
