"""Shared by the plugin tests: synthetic runs with known non-finite cells, and a real
`tensorboard` subprocess on 127.0.0.1 that is always killed."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import synthetic

from tb_nanwatch import stats, summary

COL = stats.STAT_INDEX

# The "spikes" run: 1,000 finite rows except two single-row, single-site spikes, so a
# downsampled column holds one non-finite row among ~20 finite ones.
SPIKES_ROWS = 1000
SPIKES_EVERY = 10
SPIKE_NAN = (777, 5)  # (row index, site index): one NaN element
SPIKE_NEGINF = (333, 3)  # one -Inf element


def spikes_rows(n_sites):
    rows = []
    for i in range(SPIKES_ROWS):
        step = (i + 1) * SPIKES_EVERY - 1
        row = synthetic.finite_row(n_sites, step, steps=SPIKES_EVERY)
        # A wobbling max_abs so that a mean of a bin differs from its max.
        row[:, COL["max_abs"]] *= 1 + 0.5 * np.sin(i)
        for (r, s), name in ((SPIKE_NAN, "nan"), (SPIKE_NEGINF, "neginf")):
            if i == r:
                row[s, COL[name]] = 1
                row[s, COL["nonfinite_steps"]] = 1
                row[s, COL["first_nonfinite_step"]] = step
        rows.append((step, row))
    return rows


def write_spikes_run(logdir):
    """Writes the spikes run through the real record format; returns (sites, steps, rows)."""
    sites = synthetic.sites_for()
    rows = spikes_rows(len(sites))
    with summary.RecordWriter(logdir, sites) as writer:
        for step, row in rows:
            writer.write_row(step, row)
    return sites, np.array([s for s, _ in rows]), np.stack([r for _, r in rows])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_bin():
    return os.path.join(os.path.dirname(sys.executable), "tensorboard")


def get(url, timeout=30):
    """(status, body bytes) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url, timeout=30):
    status, body = get(url, timeout)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


@contextlib.contextmanager
def tensorboard(logdir, *args, ready_timeout=90):
    """A real `tensorboard --logdir LOGDIR --host 127.0.0.1 --port P ARGS...`; yields its
    base URL once /data/plugins_listing answers; always kills it."""
    port = free_port()
    log_path = os.path.join(str(logdir), "..", "tensorboard-%d.log" % port)
    log = open(log_path, "wb")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [tensorboard_bin(), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
        + list(args),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    "tensorboard exited with %s:\n%s" % (proc.returncode, _tail(log_path))
                )
            try:
                with urllib.request.urlopen(base + "/data/plugins_listing", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "tensorboard not ready after %ss:\n%s" % (ready_timeout, _tail(log_path))
                )
            time.sleep(0.2)
        yield base
    finally:
        # The process group: tensorboard and its RustBoard data server child.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _tail(path, n=4000):
    with open(path, "rb") as f:
        return f.read()[-n:].decode("utf-8", "replace")


def wait_for(predicate, timeout, interval=0.25, what="condition"):
    """Polls `predicate()` until it returns something truthy (returned) or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


# The "blowup" run: a 4-layer MLP trained with Adam whose dense_2 gradients grow for
# ~1,200 steps until Adam's velocity of dense_2's kernel (g^2) overflows to +Inf at
# BLOWUP_STEP; the weights turn NaN a step later and everything downstream the step
# after (the shape of DESIGN.md's scenario F).  Used for the frontend test and the
# README screenshot.
BLOWUP_LAYERS = ("dense", "dense_1", "dense_2", "dense_3")
BLOWUP_EVERY = 10
BLOWUP_ROWS = 450
BLOWUP_STEP = 4203
BLOWUP_FLIGHT = 16
# The default heatmap's columns: the logged rows and the flight rows at step resolution (the
# logged row of steps 4190-4199 lies within the flight rows' steps and gives way to them).
BLOWUP_COLUMNS = BLOWUP_ROWS + BLOWUP_FLIGHT - 1
_BASE = {
    "input": 3.0,
    "activation": 4.0,
    "loss": 0.8,
    "activation_grad": 2e-3,
    "weight_grad": 1e-2,
    "weight": 0.4,
}


def _blowup_magnitudes(sites, step, rng):
    m = np.empty(len(sites))
    growth = np.exp(np.clip((step - 3000) / (BLOWUP_STEP - 3000), 0, None) * np.log(2e19))
    for i, s in enumerate(sites):
        base = _BASE.get(s["kind"], 1.0)
        if s["kind"] == "optimizer_state":
            base = 1e-3 if s["tensor"].startswith("momentum") else 1e-6
        if s["kind"] == "activation":
            base *= 1 + BLOWUP_LAYERS.index(s["layer"])
        if s["layer"] == "dense_2" and s["kind"] in (
            "weight_grad",
            "activation_grad",
            "optimizer_state",
        ):
            base *= growth ** (2 if s["tensor"].startswith("velocity") else 1)
        if s["tensor"].endswith("bias"):
            base *= 0.3
        m[i] = base * np.exp(rng.normal(0, 0.15))
    return np.minimum(m, 3.0e38)


def _blowup_bad(sites, step):
    """{site index: (nan, posinf) per element} at `step`."""
    bad = {}
    for i, s in enumerate(sites):
        velocity = s["layer"] == "dense_2" and s["tensor"].startswith("velocity")
        if velocity and step >= BLOWUP_STEP:
            bad[i] = "posinf" if step < BLOWUP_STEP + 2 else "mixed"
        elif s["layer"] == "dense_2" and s["kind"] == "weight" and step >= BLOWUP_STEP + 1:
            bad[i] = "nan"
        elif step >= BLOWUP_STEP + 2 and (
            s["kind"] in ("loss", "activation_grad", "weight_grad", "optimizer_state", "weight")
            or (s["kind"] == "activation" and s["layer"] in ("dense_2", "dense_3"))
        ):
            bad[i] = "nan"
    return bad


def _magnitude_row(sites, first, last, m, largest):
    """A finite row over steps first..last whose statistics follow the magnitudes m
    (per site), with headroom against `largest`; returns (row, element counts)."""
    row = synthetic.finite_row(len(sites), last, steps=last - first + 1)
    size = np.array([max(1, int(np.prod(s["shape"]))) for s in sites], dtype=float)
    row[:, COL["size"]] = size
    row[:, COL["min"]] = -m
    row[:, COL["max"]] = m
    row[:, COL["max_abs"]] = m
    row[:, COL["mean"]] = 0.05 * m
    row[:, COL["std"]] = 0.4 * m
    row[:, COL["norm"]] = 0.4 * m * np.sqrt(size)
    row[:, COL["max_norm"]] = 0.4 * m * np.sqrt(size)
    row[:, COL["headroom"]] = np.log2(largest / m)
    row[:, COL["zero_frac"]] = [0.3 if s["kind"] == "activation" else 0.0 for s in sites]
    return row, size


def _blowup_row(sites, first, last, rng):
    row, size = _magnitude_row(sites, first, last, _blowup_magnitudes(sites, last, rng), 3.4e38)
    for step in range(first, last + 1):
        for i, what in _blowup_bad(sites, step).items():
            if what in ("nan", "mixed"):
                row[i, COL["nan"]] += size[i] if what == "nan" else size[i] // 2
            if what in ("posinf", "mixed"):
                row[i, COL["posinf"]] += size[i] if what == "posinf" else size[i] - size[i] // 2
            row[i, COL["nonfinite_steps"]] += 1
            if np.isnan(row[i, COL["first_nonfinite_step"]]):
                row[i, COL["first_nonfinite_step"]] = step
    return row


def write_blowup_run(logdir):
    sites = synthetic.sites_for(BLOWUP_LAYERS)
    sites[0]["shape"] = [32, 64]
    rng = np.random.RandomState(0)
    with summary.RecordWriter(logdir, sites) as writer:
        for r in range(BLOWUP_ROWS):
            first, last = r * BLOWUP_EVERY, (r + 1) * BLOWUP_EVERY - 1
            writer.write_row(last, _blowup_row(sites, first, last, rng))
            if first <= BLOWUP_STEP <= last:
                fsteps = list(range(BLOWUP_STEP - BLOWUP_FLIGHT + 1, BLOWUP_STEP + 1))
                writer.write_flight(fsteps, [_blowup_row(sites, s, s, rng) for s in fsteps])
                bad = _blowup_bad(sites, BLOWUP_STEP)
                order = sorted(bad)
                size = {i: int(np.prod(sites[i]["shape"])) for i in order}
                entries = [
                    dict(
                        layer=sites[i]["layer"],
                        kind=sites[i]["kind"],
                        tensor=sites[i]["tensor"],
                        nan=0,
                        posinf=size[i],
                        neginf=0,
                    )
                    for i in order
                ]
                writer.write_first_nonfinite(
                    BLOWUP_STEP, dict(entries[0], site=order[0], propagators=entries[1:])
                )
    return sites


# The "mixed precision" runs: a 4-layer MLP under a float16 policy with a LossScaleOptimizer,
# trained on 4 workers x 2 replicas.  Adam's float16 velocities underflow from the start
# (a warning sign); the optimizer skips MP_SKIPS while it calibrates the loss scale and
# once after growing it.  With `blowup`, dense_3's float16 output grows towards float16's
# largest value (another warning sign) and overflows at MP_BLOWUP_STEP on worker_1's
# replica 3; from then on every step's gradients are non-finite, every step is skipped,
# the weights stay finite and the loss scale collapses.  For the frontend test and
# docs/screenshot_mixed_precision.png.
MP_LAYERS = ("dense", "dense_1", "dense_2", "dense_3")
MP_EVERY = 10
MP_ROWS = 245  # rows end at step 0 and at steps 9, 19, ..., 2439
MP_SKIPS = (0, 1, 2, 3, 4, 2005)
MP_BLOWUP_STEP = 2417
MP_INITIAL_SCALE = 32768.0
MP_FLIGHT = 16
FLOAT16_MAX = 65504.0
_MP_GRAD_KINDS = ("activation_grad", "weight_grad")
_MP_UNDERFLOW = ("dense", "dense_1")


def _mp_row_steps():
    """(first, last) step of every row, as the writer cuts them."""
    out = [(0, 0)]
    while len(out) < MP_ROWS:
        last = out[-1][1] + (MP_EVERY - 1 if len(out) == 1 else MP_EVERY)
        out.append((out[-1][1] + 1, last))
    return out


def _mp_magnitudes(sites, step, rng, blowup):
    m = np.empty(len(sites))
    for i, s in enumerate(sites):
        base = _BASE.get(s["kind"], 1.0)
        if s["kind"] == "optimizer_state":
            # Adam's float16 velocity (g^2 of ~1e-3 gradients) sits below float16's smallest
            # normal in the first two layers, whose gradients are the smallest.
            base = (
                1e-3
                if s["tensor"].startswith("momentum")
                else 2e-7
                if s["layer"] in _MP_UNDERFLOW
                else 3e-4
            )
        if s["kind"] == "activation":
            base *= 1 + MP_LAYERS.index(s["layer"])
        if blowup and s["layer"] == "dense_3" and s["kind"] == "activation":
            # Grows towards float16's largest value, and past it at MP_BLOWUP_STEP.
            base = min(
                16.0
                * np.exp(
                    max(0, step - 1200) / (MP_BLOWUP_STEP - 1200) * np.log(FLOAT16_MAX / 16.0)
                ),
                0.98 * FLOAT16_MAX,
            )
        if s["tensor"].endswith("bias"):
            base *= 0.3
        m[i] = base * np.exp(rng.normal(0, 0.1))
        if s["dtype"] == "float16":
            m[i] = min(m[i], 0.999 * FLOAT16_MAX)  # a finite float16 value
    return m


def _mp_bad(sites, step, blowup):
    """{site index: kind of non-finite value} at `step`."""
    bad = {}
    skipped = step in MP_SKIPS or (blowup and step >= MP_BLOWUP_STEP)
    for i, s in enumerate(sites):
        if (
            blowup
            and step >= MP_BLOWUP_STEP
            and ((s["layer"], s["kind"]) == ("dense_3", "activation") or s["kind"] == "loss")
        ):
            bad[i] = "posinf"
        elif skipped and s["kind"] in _MP_GRAD_KINDS:
            bad[i] = "nan" if blowup and step >= MP_BLOWUP_STEP else "posinf"
    return bad


def _mp_row(sites, first, last, rng, blowup):
    half = np.array([s["dtype"] == "float16" for s in sites])
    row, size = _magnitude_row(
        sites,
        first,
        last,
        _mp_magnitudes(sites, last, rng, blowup),
        np.where(half, FLOAT16_MAX, 3.4e38),
    )
    velocity = np.array(
        [s["tensor"].startswith("velocity") and s["layer"] in _MP_UNDERFLOW for s in sites]
    )
    row[:, COL["underflow_frac"]] = np.where(half, np.where(velocity, 1.0, 0.01), np.nan)
    skipped = [
        s for s in range(first, last + 1) if s in MP_SKIPS or (blowup and s >= MP_BLOWUP_STEP)
    ]
    for step in skipped:  # every non-finite value is at a skipped step
        for i, what in _mp_bad(sites, step, blowup).items():
            row[i, COL[what]] += size[i]
            row[i, COL["nonfinite_steps"]] += 1
            if np.isnan(row[i, COL["first_nonfinite_step"]]):
                row[i, COL["first_nonfinite_step"]] = step
    return row


def write_mixed_precision_run(logdir, blowup=True):
    """Writes one of the mixed-precision runs; returns (sites, skipped steps)."""
    sites = synthetic.sites_for(MP_LAYERS)
    for s in sites:
        s["dtype"] = "float32" if s["kind"] in ("input", "loss") else "float16"
    sites[0]["shape"] = [32, 64]
    rng = np.random.RandomState(1)
    skipped = [
        s for s in range(MP_ROWS * MP_EVERY) if s in MP_SKIPS or (blowup and s >= MP_BLOWUP_STEP)
    ]
    last_step = _mp_row_steps()[-1][1]
    skipped = [s for s in skipped if s <= last_step]
    scale = MP_INITIAL_SCALE
    total = 0
    collapsed = False
    with summary.RecordWriter(logdir, sites) as writer:
        for first, last in _mp_row_steps():
            for step in range(first, last + 1):
                if step == 2004:
                    scale *= 2  # 2,000 steps without a skip: the optimizer tries a larger scale
                if step in skipped:
                    scale /= 2
                    total += 1
                    writer.write_events(
                        step,
                        [
                            {
                                "type": "loss_scale_skip",
                                "step": step,
                                "skips_total": total,
                                "new_skips": 1,
                                "loss_scale": scale,
                            }
                        ],
                    )
            if scale < 1 and not collapsed:
                collapsed = True
                writer.write_events(
                    last, [{"type": "loss_scale_collapse", "step": last, "loss_scale": scale}]
                )
            writer.write_row(last, _mp_row(sites, first, last, rng, blowup))
            if blowup and first <= MP_BLOWUP_STEP <= last:
                fsteps = list(range(MP_BLOWUP_STEP - MP_FLIGHT + 1, MP_BLOWUP_STEP + 1))
                writer.write_flight(fsteps, [_mp_row(sites, s, s, rng, blowup) for s in fsteps])
                bad = _mp_bad(sites, MP_BLOWUP_STEP, blowup)
                order = sorted(bad)
                size = {i: int(np.prod(sites[i]["shape"])) or 1 for i in order}
                entries = [
                    dict(
                        layer=sites[i]["layer"],
                        kind=sites[i]["kind"],
                        tensor=sites[i]["tensor"],
                        nan=size[i] if bad[i] == "nan" else 0,
                        posinf=size[i] if bad[i] == "posinf" else 0,
                        neginf=0,
                    )
                    for i in order
                ]
                writer.write_first_nonfinite(
                    MP_BLOWUP_STEP,
                    dict(
                        entries[0],
                        site=order[0],
                        propagators=entries[1:],
                        worker="worker_1",
                        replica=3,
                        replicas=[3],
                        loss_scale_skips_before=len(MP_SKIPS),
                    ),
                )
    return sites, skipped
