"""A logdir that fills up or is read-only: training goes on, one clear error, nothing
written before is lost, and the CLI reads what is there.

The "training" is a subprocess writing rows through `summary.RecordWriter` as the writer
does.  A full disk is simulated with RLIMIT_FSIZE (Python ignores SIGXFSZ, so writes
fail with EFBIG), and for real with a 64 KiB tmpfs in a private mount namespace
(`unshare -m`, where the machine allows it).
"""

import json
import os
import shutil
import subprocess
import sys

import damage_helpers as dh
import pytest
import synthetic

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.path.dirname(__file__))
STEPS = 300
FIRST_STEP = 250

# Writes a row every 5 steps for STEPS steps and the first non-finite record at
# FIRST_STEP; prints how far "training" got.  argv: logdir, file size limit (0: none),
# "notf" to keep TensorFlow out (TensorBoard's own file writer, plain OSErrors).
TRAINING = r"""
import logging, resource, sys, types
logdir, limit, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "notf":
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
logging.basicConfig(format="%(levelname)s %(message)s")
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
import synthetic
from tb_nanwatch import summary
sites = synthetic.sites_for()
writer = summary.RecordWriter(logdir, sites, flush_secs=0.01, log_every=5)
for step in range(STEPS):
    if step % 5 == 4:
        writer.write_row(step, synthetic.finite_row(len(sites), step, steps=5))
        writer.flush()
    if step == FIRST_STEP:
        writer.write_first_nonfinite(step, dict(layer="dense", kind="activation", tensor="", nan=1,
                                                posinf=0, neginf=0, propagators=[]))
writer.close()
print("trained", step + 1, "steps; failed:", writer.failed, "dropped:", writer.dropped)
""".replace("STEPS", str(STEPS)).replace("FIRST_STEP", str(FIRST_STEP))


def _train(logdir, limit=0, mode="tf", prefix=()):
    proc = subprocess.run(
        list(prefix) + [sys.executable, "-c", TRAINING, str(logdir), str(limit), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        timeout=180,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def _check_survived(rc, out, err):
    assert rc == 0, err
    assert "trained %d steps" % STEPS in out
    assert "Traceback" not in err and "Exception in thread" not in err, err
    errors = [l for l in err.splitlines() if "tb_nanwatch: cannot write to" in l]
    assert len(errors) == 1, err  # one clear error, not one per record
    assert "Training goes on without nanwatch records from about step" in errors[0]
    # The first non-finite record could not be written: it is in the training log instead.
    assert "the first non-finite record could not be written" in err and '"layer": "dense"' in err
    return errors[0]


def _check_intact(logdir):
    """Every row whose frame reached the disk whole is read; the report runs."""
    path = dh.only_row_file(logdir / "run")
    frames, _ = dh.frames(open(path, "rb").read())
    written = [
        dh.event_of(f[2]).step
        for f in frames
        if dh.event_of(f[2]).summary.value
        and dh.event_of(f[2]).summary.value[0].tag == "nanwatch/rows"
    ]
    assert len(written) > 3
    rc, out, err = dh.run_cli(logdir, "--json")
    assert rc == 0, err
    (entry,) = json.loads(out)["runs"]
    assert entry["last_step"] == written[-1] and entry["steps_watched"] == 5 * len(written)
    return written


@pytest.mark.parametrize("mode", ["tf", "notf"])
def test_file_size_limit(tmp_path, mode):
    rc, out, err = _train(tmp_path / "run", limit=40000, mode=mode)
    error = _check_survived(rc, out, err)
    assert "File too large" in error or "EFBIG" in error or "too large" in error.lower(), error
    written = _check_intact(tmp_path)
    assert written[-1] < FIRST_STEP


def _can_unshare():
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _can_unshare(), reason="needs root and unshare -m to mount a tmpfs"
)


@needs_mounts
def test_a_full_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "copy").mkdir()
    # In a private mount namespace: the tmpfs vanishes with the process.  The logdir's
    # content is copied out before it does.
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$1" && "$2" -c "$3" "$1/run" 0 notf; rc=$?; '
        'cp -r "$1/run" "$4/run"; exit $rc'
    )
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            script,
            "sh",
            str(mnt),
            sys.executable,
            TRAINING,
            str(tmp_path / "copy"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        timeout=180,
    )
    error = _check_survived(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert "No space left on device" in error, error
    _check_intact(tmp_path / "copy")


@needs_mounts
def test_read_only_logdir(tmp_path):
    """The CLI on a read-only filesystem reads and reports; a writer there fails once, softly."""
    synthetic.write_run(str(tmp_path / "logs" / "r"), n_rows=10, log_every=5, first=(23, 3, "nan"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        'mount -t tmpfs tmpfs "$1" && cp -r "$2" "$1/logs" && mount -o remount,ro "$1" && '
        '"$3" -m tb_nanwatch.cli report "$1/logs" --json > "$4/report.json"; echo "cli $?" ; '
        '"$3" -c "$5" "$1/logs/new_run" 0 notf'
    )
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            script,
            "sh",
            str(mnt),
            str(tmp_path / "logs"),
            sys.executable,
            str(tmp_path),
            TRAINING,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        timeout=180,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "cli 1" in out, err  # a non-finite run was found and reported
    (entry,) = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert entry["first_nonfinite"]["step"] == 23
    assert proc.returncode == 0 and "trained %d steps" % STEPS in out, err
    assert err.count("tb_nanwatch: cannot create an event file in") == 1, err
    assert "Read-only file system" in err
