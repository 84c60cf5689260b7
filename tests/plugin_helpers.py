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
