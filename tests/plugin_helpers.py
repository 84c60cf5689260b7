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
SPIKE_NAN = (777, 5)      # (row index, site index): one NaN element
SPIKE_NEGINF = (333, 3)   # one -Inf element


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
        [tensorboard_bin(), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)] + list(args),
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("tensorboard exited with %s:\n%s" % (proc.returncode, _tail(log_path)))
            try:
                with urllib.request.urlopen(base + "/data/plugins_listing", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tensorboard not ready after %ss:\n%s" % (ready_timeout, _tail(log_path)))
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
_BASE = {"input": 3.0, "activation": 4.0, "loss": 0.8, "activation_grad": 2e-3,
         "weight_grad": 1e-2, "weight": 0.4}


def _blowup_magnitudes(sites, step, rng):
    m = np.empty(len(sites))
    growth = np.exp(np.clip((step - 3000) / (BLOWUP_STEP - 3000), 0, None) * np.log(2e19))
    for i, s in enumerate(sites):
        base = _BASE.get(s["kind"], 1.0)
        if s["kind"] == "optimizer_state":
            base = 1e-3 if s["tensor"].startswith("momentum") else 1e-6
        if s["kind"] == "activation":
            base *= 1 + BLOWUP_LAYERS.index(s["layer"])
        if s["layer"] == "dense_2" and s["kind"] in ("weight_grad", "activation_grad", "optimizer_state"):
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
                or (s["kind"] == "activation" and s["layer"] in ("dense_2", "dense_3"))):
            bad[i] = "nan"
    return bad


def _blowup_row(sites, first, last, rng):
    n = len(sites)
    row = synthetic.finite_row(n, last, steps=last - first + 1)
    m = _blowup_magnitudes(sites, last, rng)
    size = np.array([max(1, int(np.prod(s["shape"]))) for s in sites], dtype=float)
    row[:, COL["size"]] = size
    row[:, COL["min"]] = -m
    row[:, COL["max"]] = m
    row[:, COL["max_abs"]] = m
    row[:, COL["mean"]] = 0.05 * m
    row[:, COL["mean_every_step"]] = 0.05 * m
    row[:, COL["std"]] = 0.4 * m
    row[:, COL["norm"]] = 0.4 * m * np.sqrt(size)
    row[:, COL["headroom"]] = np.log2(3.4e38 / m)
    row[:, COL["zero_frac"]] = [0.3 if s["kind"] == "activation" else 0.0 for s in sites]
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
                entries = [dict(layer=sites[i]["layer"], kind=sites[i]["kind"], tensor=sites[i]["tensor"],
                                nan=0, posinf=size[i], neginf=0) for i in order]
                writer.write_first_nonfinite(BLOWUP_STEP, dict(entries[0], site=order[0], propagators=entries[1:]))
    return sites
