"""`tb-nanwatch report`, run as users run it: the console script in a subprocess.

Logdirs are synthetic (tests/synthetic.py writes them through the real record format).
"""

import json
import os
import pty
import select
import struct
import subprocess
import sys
import time

import damage_helpers as dh
import numpy as np
import pytest
import synthetic
from PIL import Image

from tb_nanwatch import metadata, report, stats, summary

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tb-nanwatch")
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", TF_CPP_MIN_LOG_LEVEL="2")
SITES = synthetic.sites_for()
PRODUCER = 5  # dense_2/activation_grad in synthetic.sites_for()
FIRST_STEP = 123


def cli(*args, stderr=subprocess.PIPE):
    command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "tb_nanwatch.cli"]
    proc = subprocess.run(
        command + ["report"] + [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=ENV,
        timeout=120,
    )
    return proc.returncode, proc.stdout.decode("utf-8"), (proc.stderr or b"").decode("utf-8")


def site_index(layer, kind, tensor=""):
    return next(
        i
        for i, s in enumerate(SITES)
        if (s["layer"], s["kind"], s["tensor"]) == (layer, kind, tensor)
    )


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    synthetic.write_run(
        str(root / "bad"), n_rows=50, log_every=10, first=(FIRST_STEP, PRODUCER, "nan")
    )
    synthetic.write_run(str(root / "good"), n_rows=50, log_every=10)
    # The articles' scenario F: Adam's velocity of the kernel goes +Inf at step 3.
    synthetic.write_run(
        str(root / "nested" / "adam"),
        n_rows=10,
        log_every=1,
        first=(3, site_index("dense", "optimizer_state", "velocity/kernel"), "posinf"),
    )
    return root


@pytest.fixture(scope="module")
def finite_logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    synthetic.write_run(str(root / "good"), n_rows=20, log_every=10)
    return root


def test_text_report_producer_propagators_trend(logdir):
    rc, out, err = cli(logdir)
    assert rc == 1
    assert err == ""  # no progress bar, no warnings when stderr is not a terminal
    block = out.split("\nrun bad:")[1].split("\nrun ")[0]
    assert block.startswith(" first non-finite value at step 123")
    assert "producer:   dense_2, activation gradient" in block
    assert "NaN 3, +Inf 0, -Inf 0" in block
    # Propagators: later sites of the same step, execution order, the producer not among them.
    assert "reached in the same step (26 propagators" in block
    props = block.split("propagators, execution order):\n")[1].splitlines()
    assert props[0].split() == ["dense_1,", "activation", "gradient", "NaN", "3"]
    assert props[1].split()[:3] == ["dense,", "activation", "gradient"]
    assert "... and 16 more" in block
    # The trend: the flight recorder's steps up to the first non-finite one.
    trend = block.split("(flight recorder, one row per step):\n")[1].splitlines()
    header = trend[0].split()
    assert header[:5] == ["step", "norm", "nan", "posinf", "neginf"]
    assert "max_abs" in header and "norm" in header
    rows = [line.split() for line in trend[1:9]]
    assert [int(r[0]) for r in rows] == list(range(116, 124))
    assert [r[header.index("nan")] for r in rows] == ["0"] * 7 + ["3"]
    assert float(rows[-1][header.index("max_abs")]) == pytest.approx(6.738, rel=1e-3)
    assert "watched: 500 steps (last step 499)" in block
    # Scenario F in words; the run name is its path relative to LOGDIR.
    assert "run nested/adam: first non-finite value at step 3" in out
    assert "producer:   dense, optimizer state velocity/kernel" in out
    assert "NaN 0, +Inf 3, -Inf 0" in out
    # A finite run: one line with the steps watched.
    good = [line for line in out.splitlines() if line.startswith("run good")]
    assert good == ["run good: finite: no NaN or Inf in the 500 steps (last step 499) watched"]


def test_trend_and_propagator_options(logdir):
    rc, out, _ = cli(logdir, "--run", "bad", "--steps", "3", "--propagators", "0")
    assert rc == 1
    trend = out.split("one row per step):\n")[1].splitlines()
    assert [line.split()[0] for line in trend[1:4]] == ["121", "122", "123"]
    assert not trend[4].strip()[0].isdigit()
    assert "more (--propagators" not in out
    assert "dense_2, weight bias" in out  # the last propagator is listed


def test_json_contract(logdir):
    rc, out, err = cli(logdir, "--json")
    assert rc == 1
    assert err == ""
    doc = json.loads(out)  # stdout is the JSON document and nothing else
    assert list(doc) == ["runs"]
    runs = {r["run"]: r for r in doc["runs"]}
    assert sorted(runs) == ["bad", "good", "nested/adam"]
    first = runs["bad"]["first_nonfinite"]
    assert {
        k: first[k] for k in ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf")
    } == dict(
        step=123, layer="dense_2", kind="activation_grad", tensor="", nan=3, posinf=0, neginf=0
    )
    assert first["site"] == PRODUCER
    assert len(first["propagators"]) == len(SITES) - PRODUCER - 1
    assert first["propagators"][0] == dict(
        layer="dense_1", kind="activation_grad", tensor="", nan=3, posinf=0, neginf=0
    )
    adam = runs["nested/adam"]["first_nonfinite"]
    assert (adam["step"], adam["layer"], adam["kind"], adam["tensor"], adam["posinf"]) == (
        3,
        "dense",
        "optimizer_state",
        "velocity/kernel",
        3,
    )
    assert runs["good"]["first_nonfinite"] is None
    assert runs["good"]["steps_watched"] == 500
    assert runs["good"]["loss_scale_skips"] == []


def test_exit_status_zero_when_every_run_is_finite(finite_logdir):
    rc, out, err = cli(finite_logdir, "--json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == {
        "runs": [
            {
                "run": "good",
                "first_nonfinite": None,
                "steps_watched": 200,
                "last_step": 199,
                "loss_scale_skips": [],
                "skipped_steps": 0,
                "events": [],
                "precursors": [],
                "diagnosis": [],
                "early_warning": None,
                # synthetic.finite_row's loss grows with the step: finite, but no progress
                "loss_progress": {
                    "first_step": 9,
                    "first": pytest.approx(0.05045),
                    "last_step": 199,
                    "last": pytest.approx(0.05995),
                    "progress": False,
                },
                # No stop mode, no trace record, no replay: none of the failing step's facts.
                "bundle": None,
                "producer_ops": [],
                "replay": None,
            }
        ]
    }
    rc, out, _ = cli(finite_logdir)
    assert rc == 0
    assert "run good: finite: no NaN or Inf in the 200 steps" in out


def test_finite_is_healthy_only_if_the_loss_went_down(tmp_path):
    """A loss stuck at 0.9 is "finite", not "healthy"; one that went down from 2.0 is healthy;
    the rule (5% below the first logged loss) and the words are stats.py's."""
    synthetic.write_run(
        str(tmp_path / "learning"), n_rows=20, log_every=10, loss=lambda s: 2 / (1 + s / 10)
    )
    synthetic.write_run(
        str(tmp_path / "stuck"), n_rows=20, log_every=10, loss=lambda s: 0.9 - 1e-5 * s
    )
    rc, out, err = cli(tmp_path)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert (
        "  learning: finite, 200 steps (last step 199); loss 1.053 at step 9, 0.09569 at step 199: healthy"
        in lines
    )
    assert (
        "  stuck: finite, 200 steps (last step 199); loss 0.8999 at step 9, 0.898 at step 199: finite"
        in lines
    )
    assert "healthy" not in "\n".join(l for l in lines if "stuck" in l)
    detail = out[out.index("run stuck:") :]
    assert detail.splitlines()[1] == (
        "  loss 0.8999 at step 9, 0.898 at step 199: finite: "
        + stats.RUN_STATE_MEANINGS["no_progress"]
    )
    rc, out, _ = cli(tmp_path, "--json")
    progress = {r["run"]: r["loss_progress"]["progress"] for r in json.loads(out)["runs"]}
    assert progress == {"learning": True, "stuck": False}


def test_run_filter(logdir):
    rc, out, _ = cli(logdir, "--run", "good", "--json")
    assert rc == 0
    assert [r["run"] for r in json.loads(out)["runs"]] == ["good"]
    # A path as the shell completes it (absolute, trailing slash) names the same run.
    rc, out, _ = cli(logdir, "--run", "nested/adam/", "--run", str(logdir / "good") + "/", "--json")
    assert rc == 1
    assert [r["run"] for r in json.loads(out)["runs"]] == ["nested/adam", "good"]


def test_logdir_that_is_itself_a_run_is_named_by_its_directory(logdir, tmp_path):
    """`report RUN_DIR` names the run `bad` (its directory), never the loader's "."."""
    rc, out, _ = cli(logdir / "bad", "--json")
    assert rc == 1
    (entry,) = json.loads(out)["runs"]
    assert entry["run"] == "bad" and entry["first_nonfinite"]["layer"] == "dense_2"
    rc, out, _ = cli(str(logdir / "bad") + "/", "--png", tmp_path / "bad.png")
    assert rc == 1
    assert "\n  bad: first non-finite at step %d" % FIRST_STEP in out
    assert "\nrun bad: first non-finite value at step %d" % FIRST_STEP in out
    assert "run bad," in out  # the PNG note
    assert "run .:" not in out and ".: first" not in out
    # --run takes the name the report shows.
    rc, out, err = cli(logdir / "bad", "--run", "bad", "--json")
    assert rc == 1, err
    assert [e["run"] for e in json.loads(out)["runs"]] == ["bad"]
    rc, _, err = cli(logdir / "bad", "--run", "other")
    assert rc == 2 and "runs: bad" in err


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "file",
        "empty",
        "not_nanwatch",
        "unknown_run",
        "png_parent_is_file",
        "png_is_dir",
        "png_no_dir",
        "bad_stat",
        "no_logdir",
    ],
)
def test_errors_exit_2_with_one_line(case, logdir, tmp_path):
    args = {
        "missing": [tmp_path / "nope"],
        "file": [tmp_path / "f.txt"],
        "empty": [tmp_path],
        "not_nanwatch": [tmp_path],
        "unknown_run": [logdir, "--run", "nope"],
        "png_parent_is_file": [logdir, "--png", tmp_path / "f.txt" / "x.png"],
        "png_is_dir": [logdir, "--png", tmp_path],
        "png_no_dir": [logdir, "--png", tmp_path / "no" / "x.png"],
        "bad_stat": [logdir, "--png", tmp_path / "x.png", "--stat", "nope"],
        "no_logdir": [],
    }[case]
    (tmp_path / "f.txt").write_text("x")
    if case == "not_nanwatch":  # a TensorBoard run written by something else
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        EventFileWriter(str(tmp_path / "scalars")).close()
    rc, out, err = cli(*args)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("tb-nanwatch: error: ") and "Traceback" not in err
    expected = {
        "missing": "no such directory",
        "file": "not a directory",
        "empty": "no TensorBoard event files",
        "not_nanwatch": "no nanwatch data",
        "unknown_run": "no nanwatch run 'nope'",
        "png_parent_is_file": "--png",
        "png_is_dir": "is a directory",
        "png_no_dir": "does not exist",
        "bad_stat": "--stat",
        "no_logdir": "LOGDIR",
    }[case]
    assert expected in err
    if case == "unknown_run":
        assert "runs: bad, good, nested/adam" in err
    assert not (tmp_path / "x.png").exists()


def test_loss_scale_skips(tmp_path):
    with summary.RecordWriter(str(tmp_path / "mixed"), SITES) as w:
        for i in range(30):
            w.write_row(i * 10 + 9, synthetic.finite_row(len(SITES), i * 10 + 9, steps=10))
        w.write_events(12, [{"type": "loss_scale_skip", "step": 12, "loss_scale": 32768.0}])
        w.write_events(
            40,
            [
                {"type": "loss_scale_skip", "step": 40, "loss_scale": 16384.0},
                {"type": "loss_scale_collapse", "step": 40, "loss_scale": 0.5},
            ],
        )
    rc, out, _ = cli(tmp_path, "--png", tmp_path / "m.png")
    assert rc == 0
    (line,) = [l for l in out.splitlines() if l.startswith("run mixed")]
    assert "finite" in line and "2 loss-scale skips (steps 12, 40; loss scale now 16384)" in line
    assert "skipped by design" in line and "not the blow-up" in line
    assert "\n  event at step 40: loss_scale_collapse (loss_scale 0.5)\n" in out
    _, layout = _png_layout(tmp_path / "m.png")
    assert layout["skip_columns"] == [1, 4]  # rows of 10 steps: 10-19 and 40-49
    rc, out, _ = cli(tmp_path, "--json")
    run = json.loads(out)["runs"][0]
    assert [(s["step"], s["loss_scale"]) for s in run["loss_scale_skips"]] == [
        (12, 32768.0),
        (40, 16384.0),
    ]
    assert run["events"] == [{"type": "loss_scale_collapse", "step": 40, "loss_scale": 0.5}]


def _records(path):
    """(offset, end, tag-bearing bytes) of each record in an event file."""
    data = open(path, "rb").read()
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        end = offset + 12 + length + 4
        out.append((offset, end, data[offset + 12 : offset + 12 + length]))
        offset = end
    return out


def _event_file(run_dir):
    (name,) = [n for n in os.listdir(run_dir) if "tfevents" in n]
    return os.path.join(run_dir, name)


@pytest.mark.parametrize(
    "cut", ["after_first_record", "inside_first_record", "inside_last_flight_row"]
)
def test_killed_run_truncated_last_record(tmp_path, cut):
    """A run SIGKILLed right after the first non-finite step (the next record half written),
    or while writing the first-non-finite record itself: the report still names the site."""
    run = tmp_path / "killed"
    synthetic.write_run(str(run), n_rows=20, log_every=10, first=(185, PRODUCER, "nan"))
    # The writer wrote: rows (row file) up to step 189, the flight rows of steps 178-185
    # (row file), the first-non-finite record (event file), then the row of step 199.
    events, rows_path = _event_file(run), dh.only_row_file(run)
    rows = _records(rows_path)
    events_records = _records(events)
    tag = metadata.tag(metadata.FIRST_NONFINITE).encode()
    (i,) = [k for k, r in enumerate(events_records) if tag in r[2]]
    flight_tag = metadata.tag(metadata.FLIGHT).encode()
    last_flight = max(k for k, r in enumerate(rows) if flight_tag in r[2] or b"flight" in r[2])
    if cut == "after_first_record":
        os.truncate(rows_path, rows[-1][0] + 20)  # a few bytes of the row after it
    elif cut == "inside_first_record":
        os.truncate(events, events_records[i][0] + 30)  # the record is incomplete
    else:  # ... and the flight row of that step, written before it
        os.truncate(events, events_records[i][0] + 30)
        os.truncate(rows_path, rows[last_flight][0] + 30)

    rc, out, err = cli(tmp_path, "--json")
    assert rc == 1
    assert "Traceback" not in err
    assert "truncated: the last record is incomplete" in err
    first = json.loads(out)["runs"][0]["first_nonfinite"]
    assert (first["step"], first["layer"], first["kind"]) == (185, "dense_2", "activation_grad")
    if cut != "after_first_record":
        assert first["source"] == "rows"  # taken from the rows that survived
        assert [(p["layer"], p["kind"]) for p in first["propagators"][:2]] == [
            ("dense_1", "activation_grad"),
            ("dense", "activation_grad"),
        ]
        assert len(first["propagators"]) == len(SITES) - PRODUCER - 1
    else:
        assert first["nan"] == 3 and len(first["propagators"]) == len(SITES) - PRODUCER - 1
    rc, out, _ = cli(tmp_path)
    assert rc == 1
    assert "run killed: first non-finite value at step 185" in out
    assert "producer:   dense_2, activation gradient" in out
    if cut != "after_first_record":
        assert "the first-non-finite record is missing" in out
    assert ("(no row for step 185 itself" in out) == (cut == "inside_last_flight_row")


def test_garbage_event_files(tmp_path):
    synthetic.write_run(
        str(tmp_path / "run"), n_rows=20, log_every=10, first=(185, PRODUCER, "nan")
    )
    rng = np.random.default_rng(0)
    # Garbage before and after the real file, and a run directory of nothing but garbage.
    (tmp_path / "run" / "events.out.tfevents.0000.host.garbage").write_bytes(rng.bytes(5000))
    (tmp_path / "run" / "events.out.tfevents.9999.host.garbage").write_bytes(rng.bytes(300))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 7 + rng.bytes(100))
    rc, out, err = cli(tmp_path, "--json")
    assert rc == 1
    assert "Traceback" not in err
    assert "events.out.tfevents.0000.host.garbage: not a readable event file" in err
    (entry,) = json.loads(out)["runs"]  # the garbage-only directory holds no nanwatch run
    assert entry["run"] == "run"
    assert (entry["first_nonfinite"]["step"], entry["first_nonfinite"]["layer"]) == (185, "dense_2")
    assert any("garbage" in w for w in entry["warnings"])


def test_unicode_and_markup_layer_names_as_is(tmp_path):
    layers = ["<script>alert(1)</script>", "couche_été_数据", "dense"]
    sites = synthetic.sites_for(layers)
    synthetic.write_run(
        str(tmp_path / "r"), n_rows=10, log_every=5, first=(22, 2, "neginf"), sites=sites
    )
    rc, out, _ = cli(tmp_path)
    assert rc == 1
    assert "producer:   couche_été_数据, activation" in out
    assert "<script>alert(1)</script>, activation gradient" in out
    rc, out, _ = cli(tmp_path, "--json")
    first = json.loads(out)["runs"][0]["first_nonfinite"]
    assert first["layer"] == "couche_été_数据" and first["neginf"] == 3
    assert any(p["layer"] == "<script>alert(1)</script>" for p in first["propagators"])


def test_group_of_a_second_site_list_merges_into_its_run(tmp_path):
    synthetic.write_run(str(tmp_path / "r"), n_rows=10, log_every=10, first=(75, 3, "nan"))
    small = synthetic.sites_for(["head"])
    with summary.RecordWriter(str(tmp_path / "r"), small, group="rebuilt") as w:
        for step in (109, 119):
            w.write_row(step, synthetic.finite_row(len(small), step, steps=10))
    rc, out, _ = cli(tmp_path, "--json")
    assert rc == 1
    (entry,) = json.loads(out)["runs"]
    assert entry["first_nonfinite"]["step"] == 75
    assert [g.get("group") for g in entry["groups"]] == [None, "rebuilt"]
    assert entry["steps_watched"] == 120


def _png_layout(path):
    img = Image.open(path)
    return img.convert("RGB"), json.loads(img.text["tb-nanwatch"])


def _cell(img, layout, row, col):
    gx, gy, cw, ch = layout["grid"][:4]
    return img.getpixel((gx + col * cw + cw // 2, gy + row * ch + ch // 2))


def test_png_heatmap(logdir, tmp_path):
    png = tmp_path / "bad.png"
    rc, out, _ = cli(logdir, "--run", "bad", "--png", png)
    assert rc == 1
    assert "wrote %s" % png in out
    img, layout = _png_layout(png)
    assert img.size[0] >= 640 and img.size[1] >= len(SITES) * 3
    assert len(set(img.getdata())) > 50  # a colour ramp, not a flat image
    gx, gy, cw, ch, n_cols, n_rows = layout["grid"]
    # 50 rows of 10 steps, and the flight recorder's steps 116-123 at step resolution.
    assert (n_cols, n_rows) == (58, len(SITES)) and layout["stat"] == "max_abs"
    nan = stats.STATUS_COLOURS["nan"]
    # The first non-finite cell is the producer at the column of step 123 alone.
    row, col = layout["first_cell"]
    assert (row, col) == (PRODUCER, 19)
    assert layout["column_first_steps"][col] == layout["column_last_steps"][col] == 123
    assert _cell(img, layout, row, col) == nan
    assert _cell(img, layout, row, col - 1) != nan  # finite before it
    assert (
        _cell(img, layout, row - 1, n_cols - 1) != nan
    )  # the loss, before the producer, stays finite
    assert _cell(img, layout, n_rows - 1, n_cols - 1) == nan  # propagated to the last site
    # ... and outlined: the pixels just outside the cell are the outline colour.
    x0, y0 = gx + col * cw, gy + row * ch
    assert img.getpixel((x0 - 2, y0 + ch // 2)) == report.OUTLINE
    assert img.getpixel((x0 + cw + 1, y0 + ch // 2)) == report.OUTLINE
    # +Inf / -Inf have their own colours, also in the legend.
    pixels = set(img.getdata())
    assert {
        stats.STATUS_COLOURS["+inf"],
        stats.STATUS_COLOURS["-inf"],
        stats.STATUS_COLOURS["nan"],
    } <= pixels
    # The finite run: no NaN cell anywhere in the grid.
    png_good = tmp_path / "good.png"
    rc, out, _ = cli(logdir, "--run", "good", "--png", png_good, "--stat", "norm")
    assert rc == 0
    img, layout = _png_layout(png_good)
    assert layout["stat"] == "norm" and layout["first_cell"] is None
    grid = img.crop(
        (
            layout["grid"][0],
            layout["grid"][1],
            layout["grid"][0] + 50 * layout["grid"][2],
            layout["grid"][1] + len(SITES) * layout["grid"][3],
        )
    )
    assert nan not in set(grid.getdata())


def test_png_picks_the_run_with_a_non_finite_value_and_json_stays_clean(logdir, tmp_path):
    png = tmp_path / "x.png"
    rc, out, err = cli(logdir, "--run", "good", "--run", "bad", "--png", png, "--json")
    assert rc == 1
    json.loads(out)
    assert "wrote" in err
    _, layout = _png_layout(png)
    assert layout["run"] == "bad"


def test_never_imports_tensorflow(logdir):
    code = (
        "import sys\nfrom tb_nanwatch import cli, eventfile\nrc = cli.main(['report', sys.argv[1], '--json'])\n"
        "print('TF' if 'tensorflow' in sys.modules else 'noTF', rc,\n"
        "      eventfile.CRC_IMPLEMENTATION, cli.BYTES_CHECKED[0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(logdir)], stdout=subprocess.PIPE, env=ENV, timeout=120
    )
    tf, rc, crc, checked = proc.stdout.decode().split()[-4:]
    assert (tf, rc) == ("noTF", "1")
    # ... and reads records with google-crc32c's C extension, every byte of them.
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(logdir) for f in fs)
    assert crc == "c" and int(checked) == size


def test_progress_bar_on_a_terminal_only(logdir):
    master, slave = pty.openpty()
    command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "tb_nanwatch.cli"]
    proc = subprocess.Popen(
        command + ["report", str(logdir)], stdout=subprocess.PIPE, stderr=slave, env=ENV
    )
    os.close(slave)
    seen = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read().decode()
    assert proc.wait() == 1
    text = seen.decode()
    assert "tb-nanwatch loading" in text and "MB" in text and "[" in text
    assert text.endswith("\r\x1b[K")  # the bar clears its line
    assert "\x1b" not in out and "loading" not in out  # stdout untouched


def test_record_checksum_matches_tensorboard(logdir):
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub

    from tb_nanwatch import eventfile

    rng = np.random.default_rng(1)
    for n in [0, 1, 9, 511, 1023, 1024, 1025, 3000, 70001]:
        data = rng.bytes(n)
        assert eventfile.masked_crc32c(data) == stub.masked_crc32c(data), n
    # The vectorised resynchronisation scan finds exactly the offsets a byte-by-byte check finds.
    path = _event_file(logdir / "good")
    blob = rng.bytes(3000) + open(path, "rb").read()[:5000] + bytes(2000)
    brute = [
        p
        for p in range(len(blob) - 11)
        if eventfile.masked_crc32c(blob[p : p + 8]) == struct.unpack_from("<I", blob, p + 8)[0]
    ]
    assert len(brute) > 1 and eventfile._candidates(memoryview(blob), 0, len(blob)) == brute
    assert eventfile._candidates(memoryview(blob), brute[0] + 1, len(blob)) == brute[1:]


def test_trend_takes_sampled_stats_from_rows_ending_in_the_window(tmp_path):
    """Real flight rows measure sampled statistics (max_abs, norm...) only at the first
    non-finite step; a logged row ending at a flight step has them exactly for that step."""
    col = {name: i for i, name in enumerate(report.stats.STAT_NAMES)}
    with summary.RecordWriter(str(tmp_path / "r"), SITES) as w:
        for step in (3, 7, 11, 15):
            row = synthetic.finite_row(len(SITES), step, steps=4)
            row[:, col["max_abs"]] = 1000 + step
            w.write_row(step, row)
        frows = []
        for step in range(10, 18):
            row = synthetic.finite_row(len(SITES), step)
            sampled = [s.name for s in report.stats.STATS if not s.every_step]
            if step < 17:
                row[:, [col[n] for n in sampled]] = np.nan
            else:
                row[PRODUCER:, col["nan"]] = 2
                row[:, col["max_abs"]] = 99.5
            frows.append(row)
        w.write_flight(list(range(10, 18)), frows)
        w.write_first_nonfinite(
            17,
            dict(
                layer="dense_2",
                kind="activation_grad",
                tensor="",
                site=PRODUCER,
                nan=2,
                posinf=0,
                neginf=0,
                propagators=[],
                backward_of=["head"],
            ),
        )
    rc, out, _ = cli(tmp_path)
    assert rc == 1
    lines = out.split("one row per step):\n")[1].splitlines()
    header = lines[0].split()
    table = {int(l.split()[0]): l.split() for l in lines[1:9]}
    k = header.index("max_abs")
    assert [table[s][k] for s in range(10, 18)] == ["-", "1011", "-", "-", "-", "1015", "-", "99.5"]
    assert "reached no other site in the same step" in out
    assert "computed in the backward pass of: head" in out  # the writer's extra for activation_grad


def test_trend_without_flight_recorder_uses_logged_rows(tmp_path):
    synthetic.write_run(
        str(tmp_path / "r"), n_rows=20, log_every=10, first=(185, PRODUCER, "posinf"), flight=0
    )
    rc, out, _ = cli(tmp_path, "--steps", "3")
    assert rc == 1
    assert "logged rows ending at the step shown, up to 10 steps each; no flight recorder" in out
    lines = out.split("no flight recorder in this run):\n")[1].splitlines()
    header = lines[0].split()
    assert header[:2] == ["row", "end"]
    assert [l.split()[0] for l in lines[1:4]] == ["169", "179", "189"]
    assert lines[3].split()[header.index("posinf") - 1] == "15"  # the row of steps 180-189


def test_unreadable_run_is_an_error_unless_another_run_went_non_finite(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    synthetic.write_run(str(tmp_path / "ok"), n_rows=5, log_every=10)
    meta = metadata.create_summary_metadata(
        metadata.ROWS, sites=SITES, stat_names=report.stats.STAT_NAMES
    )
    meta.plugin_data.content = json.dumps({"version": 99, "record": "rows"}).encode()
    value = summary_pb2.Summary.Value(
        tag=metadata.tag(metadata.ROWS),
        metadata=meta,
        tensor=tensor_util.make_tensor_proto(np.zeros((2, 3))),
    )
    writer = EventFileWriter(str(tmp_path / "future"))
    writer.add_event(
        event_pb2.Event(step=1, wall_time=1.0, summary=summary_pb2.Summary(value=[value]))
    )
    writer.close()
    rc, out, err = cli(tmp_path, "--json")
    assert rc == 2
    runs = {r["run"]: r for r in json.loads(out)["runs"]}
    assert runs["ok"]["first_nonfinite"] is None
    assert "newer than this reader" in runs["future"]["error"]
    assert "warning: run future: unreadable nanwatch data" in err and "Traceback" not in err
    rc, out, _ = cli(tmp_path)
    assert rc == 2 and "run future: could not be read" in out
    synthetic.write_run(str(tmp_path / "bad"), n_rows=5, log_every=10, first=(12, 1, "nan"))
    assert cli(tmp_path)[0] == 1


def test_control_characters_in_names_are_escaped(tmp_path):
    sites = synthetic.sites_for(["evil\x1b[2J\nname", "dense"])
    synthetic.write_run(
        str(tmp_path / "r"), n_rows=4, log_every=5, first=(7, 1, "nan"), sites=sites
    )
    rc, out, _ = cli(tmp_path)
    assert rc == 1
    assert "producer:   evil\\x1b[2J\\x0aname, activation" in out
    assert "\x1b" not in out
    first = json.loads(cli(tmp_path, "--json")[1])["runs"][0]["first_nonfinite"]
    assert first["layer"] == "evil\x1b[2J\nname"  # JSON keeps the name exactly


def test_png_kind_filter(logdir, tmp_path):
    png = tmp_path / "k.png"
    rc, _, _ = cli(
        logdir, "--run", "nested/adam", "--png", png, "--kind", "optimizer_state", "--stat", "mean"
    )
    assert rc == 1
    img, layout = _png_layout(png)
    n_slots = sum(1 for s in SITES if s["kind"] == "optimizer_state")
    assert layout["grid"][5] == n_slots and layout["kind"] == "optimizer_state"
    # dense/velocity/kernel is the 2nd slot; the first step is 3 with one step per column.
    assert layout["first_cell"] == [1, 3]
    assert _cell(img, layout, 1, 3) == stats.STATUS_COLOURS["+inf"]


def test_broken_pipe_keeps_the_verdict(logdir):
    command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "tb_nanwatch.cli"]
    proc = subprocess.Popen(
        command + ["report", str(logdir), "--propagators", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    proc.stdout.close()  # like `| head -0`: the reader is gone before we write
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert "Traceback" not in err and "Exception" not in err, err


def test_killed_before_the_first_row(tmp_path):
    """SIGKILL right after the first non-finite step, before any row was due (step 3 of
    log_every=100): the flight recorder and the record are all there is."""
    col = {name: i for i, name in enumerate(report.stats.STAT_NAMES)}
    writer = summary.RecordWriter(str(tmp_path / "f"), SITES)
    velocity = site_index("dense", "optimizer_state", "velocity/kernel")
    frows = []
    for step in range(4):
        row = synthetic.finite_row(len(SITES), step)
        if step == 3:
            row[velocity:, col["posinf"]] = 1
        frows.append(row)
    writer.write_flight(list(range(4)), frows)
    writer.write_first_nonfinite(
        3,
        dict(
            layer="dense",
            kind="optimizer_state",
            tensor="velocity/kernel",
            site=velocity,
            nan=0,
            posinf=1,
            neginf=0,
            propagators=[],
        ),
    )
    # no close(): the process is gone; write_first_nonfinite flushed.
    rc, out, err = cli(tmp_path, "--json")
    assert rc == 1, err
    (entry,) = json.loads(out)["runs"]
    first = entry["first_nonfinite"]
    assert (first["step"], first["layer"], first["tensor"], first["posinf"]) == (
        3,
        "dense",
        "velocity/kernel",
        1,
    )
    assert entry["steps_watched"] == 4
    rc, out, _ = cli(tmp_path, "--png", tmp_path / "f.png")
    assert rc == 1
    assert "producer:   dense, optimizer state velocity/kernel" in out
    assert [l.split()[0] for l in out.split("one row per step):\n")[1].splitlines()[1:5]] == [
        "0",
        "1",
        "2",
        "3",
    ]
    img, layout = _png_layout(tmp_path / "f.png")
    assert layout["source"] == "flight" and layout["first_cell"] == [velocity, 3]
    assert layout["stat"] == "norm"  # measured at every step of the flight recorder
    assert _cell(img, layout, velocity, 3) == stats.STATUS_COLOURS["+inf"]


def test_version_and_every_exit_status_documented():
    import tb_nanwatch

    command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "tb_nanwatch.cli"]
    proc = subprocess.run(command + ["--version"], stdout=subprocess.PIPE, env=ENV, timeout=60)
    assert (
        proc.returncode == 0
        and proc.stdout.decode().strip() == "tb-nanwatch %s" % tb_nanwatch.__version__
    )
    code, out, _ = cli("--help")
    text = " ".join(out.split())
    assert code == 0
    for status in (
        "0 every run read is finite",
        "1 at least one run",
        "2 error",
        "130 interrupted",
    ):
        assert status in text, status


def test_one_summary_line_per_run_before_the_details(logdir):
    code, out, _ = cli(logdir)
    lines = out.splitlines()
    assert code == 1 and lines[0].endswith(": 3 runs")
    summary = lines[1:4]
    assert summary[0].startswith(
        "  bad: first non-finite at step %d in dense_2, activation gradient (NaN 3)" % FIRST_STEP
    ), summary
    assert summary[1].startswith("  good: finite, 500 steps"), summary
    assert summary[2].startswith(
        "  nested/adam: first non-finite at step 3 in dense, optimizer state velocity/kernel"
    )
    assert lines[4] == "2 of 3 runs with a non-finite value"
    # The details follow, after the summary.
    assert out.index("run bad: first") > out.index(lines[4]) and out.index(
        "run good: finite"
    ) > out.index(lines[4])


def test_png_cells_take_the_tables_colours():
    values = np.array([[0.0, 1.0, 10.0, 100.0, np.nan, 5.0]])
    status = np.array([[0, 0, 0, 0, 0, 1]], dtype=np.uint8)
    cells, lo, hi = report.cell_colours(values, status, "log")
    assert tuple(cells[0, 0]) == stats.ZERO_COLOUR  # an exact 0 is not the ramp's palest
    assert tuple(cells[0, 1]) == tuple(stats.FINITE_RAMP[0]) and tuple(cells[0, 3]) == tuple(
        stats.FINITE_RAMP[-1]
    )
    assert tuple(cells[0, 4]) == stats.NOT_MEASURED_COLOUR
    assert tuple(cells[0, 5]) == stats.STATUS_COLOURS["nan"]
    # Headroom: low is the danger, so few doublings left read dark.
    headroom = np.array([[2.0, 120.0]])
    danger = report.cell_colours(headroom, np.zeros((1, 2), np.uint8), "linear", danger_low=True)[0]
    assert tuple(danger[0, 0]) == tuple(stats.FINITE_RAMP[-1]) and tuple(danger[0, 1]) == tuple(
        stats.FINITE_RAMP[0]
    )


def test_png_marker_names_the_first_steps_own_column(tmp_path):
    # One row per 100 steps; the first non-finite at step 2 sits in a column of its own.
    synthetic.write_run(
        str(tmp_path / "logs" / "coarse"), n_rows=900, log_every=100, first=(2, PRODUCER, "posinf")
    )
    png = tmp_path / "h.png"
    code, out, err = cli(tmp_path / "logs", "--png", png)
    assert code == 1, err
    layout = json.loads(Image.open(png).text["tb-nanwatch"])
    row, col = layout["first_cell"]
    assert layout["column_first_steps"][col] <= 2 <= layout["column_last_steps"][col]
    # 900 rows in at most 450 columns, but step 2 (a flight row) is not merged with another:
    # the steps before it and after it in its logged row are columns of their own.
    assert layout["column_first_steps"][col] == layout["column_last_steps"][col] == 2
    assert layout["column_first_steps"][col + 1] == 3


def test_two_writer_sessions_in_one_run_directory_show_the_latest_with_a_warning(tmp_path):
    """A script re-run into logs/run1: the older session blew up at step 33 in one site, the
    newer one at step 123 in another.  The report is the newer session's, never a mix,
    and a warning names both sessions."""
    run = str(tmp_path / "logs" / "run1")
    other = site_index("dense", "optimizer_state", "velocity/kernel")
    synthetic.write_run(run, n_rows=50, log_every=10, first=(33, other, "posinf"))
    time.sleep(1.2)
    synthetic.write_run(run, n_rows=20, log_every=10, first=(FIRST_STEP, PRODUCER, "nan"))
    code, out, err = cli(tmp_path / "logs", "--json")
    (entry,) = json.loads(out)["runs"]
    assert (
        entry["first_nonfinite"]["step"] == FIRST_STEP
        and entry["first_nonfinite"]["kind"] == "activation_grad"
    )
    warning = [w for w in entry.get("warnings", []) if "writer sessions" in w]
    assert (
        warning
        and "2 writer sessions" in warning[0]
        and "steps 9-499" in warning[0]
        and "steps 9-199" in warning[0]
    )
    code, out, err = cli(tmp_path / "logs")
    assert "2 writer sessions in this run directory" in err
    trend = out.split("before it")[1]
    steps = [
        int(line.split()[0])
        for line in trend.splitlines()[2:]
        if line.strip() and line.split()[0].isdigit()
    ]
    assert steps == sorted(set(steps)), steps  # one flight recorder, not two interleaved
