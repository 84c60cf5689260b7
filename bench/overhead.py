"""What watching costs: tb_nanwatch beside TensorFlow's own tools, as ratios to plain model.fit.

    .venv/bin/python bench/overhead.py                       # full run (~10-15 min on 2 cores)
    .venv/bin/python bench/overhead.py --quick               # smoke run (~3 min)
    .venv/bin/python bench/overhead.py --out bench/RESULTS.md

Method (see bench/README.md):
* Every configuration trains its own copy of the same model (same seed).  Its first
  fit() call (one "epoch" of --steps steps, holding the trace/compile) is a warm-up and
  is reported only as "first step" time.  Then R rounds; in each round every configuration
  runs one more epoch of --steps steps, the order alternating forward and backward
  (A B C .. C B A ..), so every configuration is measured next to plain fit in time.
* A timing callback, last in the callback list, takes the time at every batch end after
  reading the loss (a host sync), so step time includes every other callback's batch-end
  work; the first interval of each fit() call is dropped.  Step time = median of the
  epoch's intervals; the figure reported is the median over rounds of
  (config median / plain median in the same round), with the min-max over rounds.
* The global tools (enable_check_numerics, Debugger V2 dumps) run in their own
  subprocess each: plain fit is traced and measured there before the tool is enabled,
  then tool and plain epochs alternate with the tool enabled (it cannot be switched off
  and on again: re-enabling the dump crashed the process here).
* NanWatchCallback keeps its instrumented, traced train function across fit() calls, as
  Keras keeps its own, so each round does not pay a new trace; the trace cost is reported
  once, in the "first step" column.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from results_md import publish, update_results  # bench/ is the script's directory

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 128

LEAN_EXCLUDES = ("weight", "optimizer_state")
# In-process configurations: name -> (jit_compile, description).
INPROC = {
    "plain": (False, "model.fit, no monitoring callback"),
    "defaults": (False, "NanWatchCallback(logdir): every site kind, a row every 100 steps"),
    "lean": (False, "NanWatchCallback(kinds=all but weight and optimizer_state), rows every 100"),
    "every10": (False, "NanWatchCallback(log_every=10): defaults with a row every 10 steps"),
    "floor": (False, "one L2 norm per watched tensor per step into a variable, nothing else"),
    "tb_hist": (False, "keras.callbacks.TensorBoard(histogram_freq=1)"),
    "plain_xla": (True, "model.fit, jit_compile=True"),
    "defaults_xla": (True, "NanWatchCallback defaults, jit_compile=True"),
    "lean_xla": (True, "lean, jit_compile=True"),
    "floor_xla": (True, "floor, jit_compile=True"),
    "tb_hist_xla": (True, "TensorBoard(histogram_freq=1), jit_compile=True"),
}
GLOBAL_TOOLS = {
    "check_numerics": "tf.debugging.enable_check_numerics()",
    "dump_curt": 'enable_dump_debug_info(dir, tensor_debug_mode="CURT_HEALTH")',
    "dump_concise": 'enable_dump_debug_info(dir, tensor_debug_mode="CONCISE_HEALTH")',
}
MODELS = {
    "mlp": "784-1024x3-10 MLP, relu, softmax head, adam, categorical cross-entropy, batch 128",
    "conv": "32x32x3 conv net: Conv(16,3x3)-pool-Conv(32,3x3)-pool-Dense(64)-Dense(10), adam, batch 128",
    "tiny": "the MLP's structure with 16-unit layers (784-16x3-10), batch 128: shows the fixed cost per step",
}
TINY_CONFIGS = ("plain", "defaults", "lean", "floor")


# ----------------------------------------------------------------------------- worker side
def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: F401
    import tensorflow as tf  # noqa: F401

    return tf, keras


def build_model(name, jit=False, narrow=False):
    tf, keras = _tf()
    keras.utils.set_random_seed(0)
    L = keras.layers
    if name in ("mlp", "tiny"):
        width = 16 if narrow or name == "tiny" else 1024
        model = keras.Sequential(
            [keras.Input((784,))]
            + [L.Dense(width, activation="relu") for _ in range(3)]
            + [L.Dense(10, activation="softmax")]
        )
    elif name == "conv":
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                L.Conv2D(16, 3, padding="same", activation="relu"),
                L.MaxPooling2D(),
                L.Conv2D(32, 3, padding="same", activation="relu"),
                L.MaxPooling2D(),
                L.Flatten(),
                L.Dense(64, activation="relu"),
                L.Dense(10, activation="softmax"),
            ]
        )
    else:
        raise ValueError(name)
    model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=jit)
    return model


def make_data(name, steps, batch=BATCH):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if name == "conv" else (784,)
    x = rng.normal(size=(steps * batch,) + shape).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, steps * batch)]
    return x, y


def _step_timer_class():
    _, keras = _tf()

    class StepTimer(keras.callbacks.Callback):
        """Last callback: time between batch ends, after a host sync on the loss."""

        async_safe = False

        def __init__(self):
            super().__init__()
            self.wall, self.cpu, self.first = [], [], None
            self._prev = None
            self.budget = None  # seconds after the first step; then fit() is stopped
            self.stopped = False

        def on_train_begin(self, logs=None):
            self.wall, self.cpu, self._prev = [], [], None
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float((logs or {}).get("loss", 0.0))  # host sync (Keras already pythonifies)
            now, cpu = time.perf_counter(), time.process_time()
            if self._prev is None:
                self.first = now - self._t0
                self._t1 = now
            else:
                self.wall.append(now - self._prev[0])
                self.cpu.append(cpu - self._prev[1])
            self._prev = (now, cpu)
            if self.budget is not None and now - self._t1 > self.budget:
                self.model.stop_training = True  # pathologically slow configuration
                self.stopped = True

    return StepTimer


def _bench_nanwatch_class(floor=False):
    """The callback measured: it keeps its traced train function across fit() calls, so each
    timed epoch (one fit()) runs the same instrumented function."""
    if floor:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from floor import FloorCallback

        return FloorCallback
    import tb_nanwatch

    return tb_nanwatch.NanWatchCallback


def make_callbacks(config, logdir):
    """(callbacks, closer) for an in-process configuration."""
    _, keras = _tf()
    from tb_nanwatch import stats

    base = config.replace("_xla", "")
    if base == "plain":
        return [], lambda: None
    if base == "tb_hist":
        cb = keras.callbacks.TensorBoard(logdir, histogram_freq=1)
        return [cb], lambda: None
    Callback = _bench_nanwatch_class(floor=base == "floor")
    if base == "defaults":
        cb = Callback(logdir)
    elif base == "lean":
        cb = Callback(logdir, kinds=[k for k in stats.KINDS if k not in LEAN_EXCLUDES])
    elif base == "every10":
        cb = Callback(logdir, log_every=10)
    elif base == "floor":
        cb = Callback(logdir)
    else:
        raise ValueError(config)
    return [cb], lambda: None


def _block(model, x, y, callbacks, timer):
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks + [timer]
    )
    import numpy as np

    return {
        "median_ms": 1e3 * float(np.median(timer.wall)),
        "mean_ms": 1e3 * float(np.mean(timer.wall)),
        "cpu_median_ms": 1e3 * float(np.median(timer.cpu)),
        "n": len(timer.wall),
    }


def _rounds_order(names, r):
    return list(names) if r % 2 == 0 else list(reversed(names))


# Neighbours measured next to each other; a reference (plain) block between every group.
GROUPS = (
    ("defaults", "floor"),
    ("lean", "every10"),
    ("tb_hist",),
    ("defaults_xla", "floor_xla"),
    ("lean_xla", "tb_hist_xla"),
)


def _reference(name):
    return "plain_xla" if name.endswith("_xla") else "plain"


def _round_sequence(names, r):
    """P g1 P g2 P ... (g = GROUPS present), each group followed by its reference again;
    reversed in odd rounds.  Every block then has a reference block at most two blocks away."""
    seq = []
    for group in GROUPS:
        group = [n for n in group if n in names]
        if not group:
            continue
        ref = _reference(group[0])
        if ref in names and (not seq or seq[-1] != ref):
            seq.append(ref)
        seq += group
        if ref in names:
            seq.append(ref)
    seq += [n for n in names if n not in seq]
    return seq if r % 2 == 0 else list(reversed(seq))


def _attach_refs(sequence):
    """sequence: [(name, block)] in time order.  Gives every block of a non-reference
    configuration `ref`: the mean of the nearest reference blocks before and after it."""
    keys = ("median_ms", "mean_ms", "cpu_median_ms")
    for i, (name, block) in enumerate(sequence):
        ref = _reference(name)
        if name == ref:
            continue
        near = []
        for rng in (range(i - 1, -1, -1), range(i + 1, len(sequence))):
            for j in rng:
                if sequence[j][0] == ref:
                    near.append(sequence[j][1])
                    break
        if near:
            block["ref"] = {k: sum(b[k] for b in near) / len(near) for k in keys}


def _first_line(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    m = re.search(r"Detected unsupported operations[^:]*?on (\w+): (\w+) \(No registered", text)
    if m:
        return "%s: %s cannot compile op %s (no XLA kernel registered)" % (
            type(exc).__name__,
            m.group(1),
            m.group(2),
        )
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return " ".join(lines[:2])[:300]


def worker_inproc(args):
    """Plain, NanWatch settings and the Keras TensorBoard callback, alternated in one process."""
    tf, keras = _tf()
    StepTimer = _step_timer_class()
    x, y = make_data(args.model, args.steps)
    configs = [c for c in args.configs.split(",") if c]
    tmp = tempfile.mkdtemp(prefix="nw_bench_")
    out = {
        "model": args.model,
        "configs": {},
        "errors": {},
        "sites": {},
        "logdir_bytes": {},
        "too_slow": {},
    }
    live = {}
    for name in configs:
        jit = INPROC[name][0]
        logdir = os.path.join(tmp, name)
        try:
            model = build_model(args.model, jit=jit)
            callbacks, closer = make_callbacks(name, logdir)
            timer = StepTimer()
            timer.budget = args.budget
            t0 = time.perf_counter()
            model.fit(
                x,
                y,
                batch_size=BATCH,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=callbacks + [timer],
            )
            warm = time.perf_counter() - t0
        except Exception as e:  # a configuration that cannot run is reported, not fatal
            out["errors"][name] = _first_line(e)
            print("  %-13s FAILED: %s" % (name, out["errors"][name]), flush=True)
            continue
        out["configs"][name] = {"first_step_s": timer.first, "warmup_epoch_s": warm, "blocks": []}
        if callbacks and hasattr(callbacks[0], "watch") and callbacks[0].watch is not None:
            out["sites"][name] = len(callbacks[0].watch.sites)
        print(
            "  %-13s first step %.1f s (trace/compile), warm-up epoch %.1f s"
            % (name, timer.first, warm),
            flush=True,
        )
        if timer.stopped:
            out["too_slow"][name] = _too_slow(timer)
            print(
                "  %-13s too slow, left out of the rounds: %s" % (name, out["too_slow"][name]),
                flush=True,
            )
            closer()
            continue
        live[name] = (model, callbacks, closer, timer)
    names = list(live)
    sequence = []
    for r in range(args.rounds):
        for name in _round_sequence(names, r):
            if name not in live or (
                sequence and sequence[-1][0] == name and name == _reference(name)
            ):
                continue  # (a reference epoch right after itself, at a round boundary)
            model, callbacks, _, timer = live[name]
            block = dict(_block(model, x, y, callbacks, timer), round=r)
            out["configs"][name]["blocks"].append(block)
            sequence.append((name, block))
            if timer.stopped:
                out["too_slow"][name] = _too_slow(timer)
                live.pop(name)[2]()
        print(
            "  round %d/%d: %s"
            % (
                r + 1,
                args.rounds,
                " ".join(
                    "%s=%.1f" % (n, out["configs"][n]["blocks"][-1]["median_ms"]) for n in names
                ),
            ),
            flush=True,
        )
    _attach_refs(sequence)
    for name, (_, _, closer, _) in live.items():
        closer()
        out["logdir_bytes"][name] = du(os.path.join(tmp, name))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _too_slow(timer):
    import numpy as np

    return "stopped after %d steps, median step %.2f s (budget %d s per epoch)" % (
        len(timer.wall) + 1,
        float(np.median(timer.wall)) if timer.wall else float("nan"),
        timer.budget,
    )


_SCRATCH = []  # directories a worker removes before it exits


def _enable(tool, dump_root):
    tf, _ = _tf()
    if tool == "check_numerics":
        tf.debugging.enable_check_numerics()
    else:
        mode = {"dump_curt": "CURT_HEALTH", "dump_concise": "CONCISE_HEALTH"}[tool]
        tf.debugging.experimental.enable_dump_debug_info(dump_root, tensor_debug_mode=mode)


def worker_global(args):
    """One global tool: plain traced before enabling it, then tool and plain alternated."""
    tf, keras = _tf()
    StepTimer = _step_timer_class()
    x, y = make_data(args.model, args.steps)
    dump_root = tempfile.mkdtemp(prefix="nw_dump_")
    _SCRATCH.append(dump_root)
    out = {"model": args.model, "tool": args.tool, "configs": {}, "errors": {}}
    plain, ptimer = build_model(args.model), StepTimer()
    plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[ptimer])
    out["configs"]["plain"] = {"first_step_s": ptimer.first, "blocks": []}
    out["configs"]["plain_before_enable"] = {
        "blocks": [dict(_block(plain, x, y, [], ptimer), round=-1) for _ in range(2)]
    }
    _enable(args.tool, dump_root)
    tool, ttimer = build_model(args.model), StepTimer()
    ttimer.budget = args.budget
    try:
        tool.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[ttimer])
    except Exception as e:
        out["errors"][args.tool] = _first_line(e)
        return out
    out["configs"][args.tool] = {"first_step_s": ttimer.first, "blocks": []}
    print("  %-13s first step %.1f s" % (args.tool, ttimer.first), flush=True)
    if ttimer.stopped:
        out["errors"][args.tool] = "too slow: " + _too_slow(ttimer)
        return out
    pair = {"plain": (plain, ptimer), args.tool: (tool, ttimer)}
    sequence = []
    for r in range(args.rounds):
        for name in _rounds_order(list(pair), r):
            model, timer = pair[name]
            block = dict(_block(model, x, y, [], timer), round=r)
            out["configs"][name]["blocks"].append(block)
            sequence.append((name, block))
        _attach_refs(sequence)
        print(
            "  round %d/%d: plain=%.1f %s=%.1f"
            % (
                r + 1,
                args.rounds,
                out["configs"]["plain"]["blocks"][-1]["median_ms"],
                args.tool,
                out["configs"][args.tool]["blocks"][-1]["median_ms"],
            ),
            flush=True,
        )
    if args.probe_xla:
        try:
            xm = build_model(args.model, jit=True)
            xm.fit(x[: 3 * BATCH], y[: 3 * BATCH], batch_size=BATCH, epochs=1, verbose=0)
            out["xla_probe"] = "ran (no error)"
        except Exception as e:
            out["xla_probe"] = _first_line(e)
        print("  xla probe: %s" % out["xla_probe"], flush=True)
    return out


def worker_disk(args):
    """Disk for a 1,000-step run (2 epochs x 500 steps), on the MLP's layer structure with
    narrow layers and batch 16: none of these tools writes bytes that scale with tensor
    sizes (they log per site / op / weight), and the narrow model keeps this phase short."""
    tf, keras = _tf()
    import tb_nanwatch
    from tb_nanwatch import stats

    batch, steps = args.disk_batch, args.disk_steps
    x, y = make_data("mlp", steps // 2, batch)
    root = tempfile.mkdtemp(prefix="nw_disk_")
    out = {}
    tools = [t for t in args.tools.split(",") if t]
    for tool in tools:
        d = os.path.join(root, tool)
        model = build_model("mlp", narrow=args.narrow)
        cbs = []
        if tool == "defaults":
            cbs = [tb_nanwatch.NanWatchCallback(d)]
        elif tool == "lean":
            cbs = [
                tb_nanwatch.NanWatchCallback(
                    d, kinds=[k for k in stats.KINDS if k not in LEAN_EXCLUDES]
                )
            ]
        elif tool == "every10":
            cbs = [tb_nanwatch.NanWatchCallback(d, log_every=10)]
        elif tool == "tb_hist":
            cbs = [keras.callbacks.TensorBoard(d, histogram_freq=1)]
        elif tool == "tb_plain":
            cbs = [keras.callbacks.TensorBoard(d)]
        elif tool.startswith("dump_") or tool == "check_numerics":
            mode = {
                "dump_curt": "CURT_HEALTH",
                "dump_concise": "CONCISE_HEALTH",
                "dump_curt_all": "CURT_HEALTH",
                "dump_concise_all": "CONCISE_HEALTH",
            }.get(tool)
            if tool == "check_numerics":
                tf.debugging.enable_check_numerics()
            else:
                buf = -1 if tool.endswith("_all") else 1000
                tf.debugging.experimental.enable_dump_debug_info(
                    d, tensor_debug_mode=mode, circular_buffer_size=buf
                )
        t0 = time.perf_counter()
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=2,
            steps_per_epoch=steps // 2,
            shuffle=False,
            verbose=0,
            callbacks=cbs,
        )
        if tool.startswith("dump_"):
            tf.debugging.experimental.disable_dump_debug_info()  # flushes the circular buffer
        out[tool] = {
            "bytes": du(d),
            "steps": steps,
            "seconds": time.perf_counter() - t0,
            "sites": len(cbs[0].watch.sites) if cbs and hasattr(cbs[0], "watch") else None,
        }
        print("  disk %-16s %10d bytes" % (tool, out[tool]["bytes"]), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return out


def du(path):
    total = 0
    for r, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(r, f))
            except OSError:
                pass
    return total


# ----------------------------------------------------------------------------- record size
def record_sizes():
    """Bytes per site per logged row, from the real RecordWriter (TF-free)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import numpy as np

    from tb_nanwatch import stats, summary

    def size(n_sites, n_rows):
        d = tempfile.mkdtemp(prefix="nw_rec_")
        sites = [
            summary.make_site(
                "model/dense_%d" % i,
                stats.KINDS[i % len(stats.KINDS)],
                "kernel",
                "float32",
                (1024, 1024),
            )
            for i in range(n_sites)
        ]
        row = np.random.default_rng(0).normal(size=(n_sites, len(stats.STATS)))
        with summary.RecordWriter(d, sites) as w:
            for i in range(n_rows):
                w.write_row(i * 100 + 99, row)
        b = du(d)
        shutil.rmtree(d, ignore_errors=True)
        return b

    out = {"n_stats": len(stats.STATS)}
    for n in (42, 1000):
        per_row = (size(n, 40) - size(n, 20)) / 20.0
        out["row_bytes_%d" % n] = per_row
        out["header_bytes_%d" % n] = size(n, 20) - 20 * per_row
    out["per_site_per_row"] = (out["row_bytes_1000"] - out["row_bytes_42"]) / (1000 - 42)
    out["per_row_fixed"] = out["row_bytes_42"] - 42 * out["per_site_per_row"]
    return out


# ----------------------------------------------------------------------------- parent side
def run_worker(argv, timeout):
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--json-out", path] + argv
    print("$ %s" % " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        with open(path) as f:
            text = f.read()
        result = json.loads(text) if text else None
        if result is None:
            tail = [l for l in proc.stderr.splitlines() if l.strip()][-3:]
            result = {"worker_error": "exit %d: %s" % (proc.returncode, " | ".join(tail))}
    except subprocess.TimeoutExpired:
        result = {"worker_error": "timed out after %d s" % timeout}
    finally:
        os.unlink(path)
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarise(configs, base="plain"):
    """{config: {...}} ratios to `base`, median and min-max over rounds.  A block is compared
    with the mean of its neighbouring reference blocks (`ref`, see _attach_refs) when `base`
    is its reference, else with `base`'s block of the same round."""
    import numpy as np

    rows = {}
    base_blocks = {b["round"]: b for b in configs.get(base, {}).get("blocks", [])}
    for name, c in configs.items():
        blocks = c.get("blocks", [])
        if not blocks:
            continue
        ratios, mean_ratios, cpu_ratios, added = [], [], [], []
        if name == base:  # the reference against itself: each epoch / the next one (the noise)
            pairs = list(zip(blocks[:-1], blocks[1:]))
        else:
            pairs = []
        for b, p in pairs:
            ratios.append(b["median_ms"] / p["median_ms"])
            added.append(b["median_ms"] - p["median_ms"])
            mean_ratios.append(b["mean_ms"] / p["mean_ms"])
            cpu_ratios.append(b["cpu_median_ms"] / p["cpu_median_ms"])
        for b in blocks if name != base else []:
            p = b.get("ref") if base == _reference(name) and name != base else None
            p = p or base_blocks.get(b["round"])
            if p is None:
                continue
            ratios.append(b["median_ms"] / p["median_ms"])
            added.append(b["median_ms"] - p["median_ms"])
            mean_ratios.append(b["mean_ms"] / p["mean_ms"])
            cpu_ratios.append(b["cpu_median_ms"] / p["cpu_median_ms"])
        rows[name] = {
            "median_ms": float(np.median([b["median_ms"] for b in blocks])),
            "ratio": float(np.median(ratios)) if ratios else None,
            "ratio_min": float(np.min(ratios)) if ratios else None,
            "ratio_max": float(np.max(ratios)) if ratios else None,
            "mean_ratio": float(np.median(mean_ratios)) if mean_ratios else None,
            "cpu_ratio": float(np.median(cpu_ratios)) if cpu_ratios else None,
            "rounds": len(ratios),
            "added_ms": float(np.median(added)) if added else None,
            "slower": int(sum(1 for x in ratios if x > 1.0)),
            "first_step_s": c.get("first_step_s"),
        }
    return rows


def code_version():
    """HEAD, and whether tb_nanwatch/ differs from it (others edit the same checkout)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tb_nanwatch"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return head + (" (tb_nanwatch/ with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine():
    info = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu"] = m.group(1).strip() if m else "?"
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s*(\d+)", f.read())
            info["mem_gb"] = round(int(m.group(1)) / 1024 / 1024, 1)
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    info["commit"] = code_version()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import tensorflow as tf, keras, tensorboard;"
                "print(tf.__version__, keras.__version__, tensorboard.__version__)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()
        info["tensorflow"], info["keras"], info["tensorboard"] = out[-3:]
    except Exception:
        pass
    return info


def fmt_ratio(r):
    if r.get("ratio") is None:
        return "-"
    return "%.2fx (%.2f-%.2f, slower in %d/%d)" % (
        r["ratio"],
        r["ratio_min"],
        r["ratio_max"],
        r["slower"],
        r["rounds"],
    )


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return "%.1f %s" % (b / k, unit)
    return "%d B" % b


def render(results):
    L = []
    a = results["args"]
    m = results["machine"]
    L.append("## Training overhead (`bench/overhead.py`)")
    L.append("")
    L.append(
        "Run %s, %s mode, %d rounds x %d timed steps per configuration, %s."
        % (
            results["date"],
            "quick" if a["quick"] else "full",
            a["rounds"],
            a["steps"] - 1,
            "total %.0f s" % results["total_s"],
        )
    )
    L.append(
        "Machine: %s CPUs (%s), %s GB RAM; TensorFlow %s, Keras %s, TensorBoard %s, Python %s. "
        "Load average at start %.2f, at end %.2f (1 min)."
        % (
            m.get("nproc"),
            m.get("cpu"),
            m.get("mem_gb"),
            m.get("tensorflow"),
            m.get("keras"),
            m.get("tensorboard"),
            m.get("python"),
            m["loadavg_start"][0],
            results["loadavg_end"][0],
        )
    )
    L.append("")
    L.append("Code: commit %s. Command: `%s`" % (m.get("commit", "?"), results["command"]))
    L.append("")
    L.append(
        "Ratio = median over rounds of (median step time of the configuration's epoch / median step time of "
        "plain fit in the neighbouring epochs of the same process: the mean of the nearest plain epoch before and "
        "after, at most two epochs away); in brackets the min-max over rounds and in how many rounds the "
        "configuration was the slower one. For plain itself: each plain epoch / "
        "the next plain epoch, i.e. the noise of the measurement. *added per step* = the same as a "
        "difference in ms. *mean* = the same with "
        "mean step times (includes the steps that write a row and each epoch's end work); *CPU* = the "
        "same with process CPU time per step, less sensitive to other load on the machine. "
        "*first step* = the first step of the first fit(): trace, graph optimisation / XLA compile and one step."
    )
    for model, res in results["models"].items():
        L.append("")
        L.append("### %s" % MODELS[model])
        L.append("")
        L.append(
            "| configuration | median ratio (min-max) | mean ratio | CPU ratio | added per step | median step | first step | sites |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        inproc = res.get("inproc", {})
        rows = summarise(inproc.get("configs", {}))
        xla_rows = summarise(
            {k: v for k, v in inproc.get("configs", {}).items() if k.endswith("_xla")},
            base="plain_xla",
        )
        for name in INPROC:
            if name.endswith("_xla"):
                continue
            if name in rows:
                r = rows[name]
                L.append(
                    "| %s | %s | %.2fx | %.2fx | %+.1f ms | %.1f ms | %.1f s | %s |"
                    % (
                        name,
                        fmt_ratio(r),
                        r["mean_ratio"],
                        r["cpu_ratio"],
                        r["added_ms"],
                        r["median_ms"],
                        r["first_step_s"] or 0,
                        inproc.get("sites", {}).get(name, ""),
                    )
                )
            elif name in inproc.get("errors", {}):
                L.append("| %s | failed: %s | | | | | | |" % (name, inproc["errors"][name]))
            elif name in inproc.get("too_slow", {}):
                L.append(
                    "| %s | too slow: %s | | | | | %.1f s | |"
                    % (name, inproc["too_slow"][name], inproc["configs"][name]["first_step_s"] or 0)
                )
        for tool in GLOBAL_TOOLS:
            g = res.get(tool)
            if not g:
                continue
            if g.get("worker_error") or tool in g.get("errors", {}):
                L.append(
                    "| %s | failed: %s | | | | | | |"
                    % (tool, g.get("worker_error") or g["errors"][tool])
                )
                continue
            gr = summarise(g["configs"])
            r = gr[tool]
            pre = gr.get("plain_before_enable", {}).get("median_ms")
            L.append(
                "| %s (own process; plain there %.1f ms, %.1f ms before enabling) | %s | %.2fx | %.2fx | %+.1f ms | %.1f ms | %.1f s | |"
                % (
                    tool,
                    gr["plain"]["median_ms"],
                    pre or float("nan"),
                    fmt_ratio(r),
                    r["mean_ratio"],
                    r["cpu_ratio"],
                    r["added_ms"],
                    r["median_ms"],
                    r["first_step_s"] or 0,
                )
            )
        vs_floor = summarise(inproc.get("configs", {}), base="floor")
        vs_floor_xla = summarise(
            {k: v for k, v in inproc.get("configs", {}).items() if k.endswith("_xla")},
            base="floor_xla",
        )
        parts = [
            "%s / floor = %s, %+.1f ms" % (n, fmt_ratio(vs_floor[n]), vs_floor[n]["added_ms"])
            for n in ("defaults", "lean", "every10")
            if n in vs_floor and "floor" in vs_floor
        ]
        parts += [
            "%s / floor_xla = %s, %+.1f ms"
            % (n, fmt_ratio(vs_floor_xla[n]), vs_floor_xla[n]["added_ms"])
            for n in ("defaults_xla", "lean_xla")
            if n in vs_floor_xla and "floor_xla" in vs_floor_xla
        ]
        if parts:
            L.append("")
            L.append(
                "Against the floor, paired in the same rounds (target: defaults within 1.02x): "
                + "; ".join(parts)
                + "."
            )
        if any(k.endswith("_xla") for k in inproc.get("configs", {})) or any(
            k.endswith("_xla") for k in inproc.get("errors", {})
        ):
            L.append("")
            L.append(
                "Under `jit_compile=True` (ratios to plain fit with `jit_compile=True` in the same process; "
                "plain XLA / plain non-XLA = %s):"
                % ("%.2fx" % (rows["plain_xla"]["ratio"]) if "plain_xla" in rows else "-")
            )
            L.append("")
            L.append(
                "| configuration | median ratio (min-max) | mean ratio | CPU ratio | median step | first step |"
            )
            L.append("|---|---|---|---|---|---|")
            for name in INPROC:
                if not name.endswith("_xla"):
                    continue
                if name in xla_rows:
                    r = xla_rows[name]
                    L.append(
                        "| %s | %s | %.2fx | %.2fx | %.1f ms | %.1f s |"
                        % (
                            name,
                            fmt_ratio(r),
                            r["mean_ratio"],
                            r["cpu_ratio"],
                            r["median_ms"],
                            r["first_step_s"] or 0,
                        )
                    )
                elif name in inproc.get("errors", {}):
                    L.append("| %s | failed: %s | | | | |" % (name, inproc["errors"][name]))
                elif name in inproc.get("too_slow", {}):
                    L.append(
                        "| %s | too slow: %s | | | | %.1f s |"
                        % (
                            name,
                            inproc["too_slow"][name],
                            inproc["configs"][name]["first_step_s"] or 0,
                        )
                    )
            for tool in GLOBAL_TOOLS:
                probe = res.get(tool, {}).get("xla_probe")
                if probe:
                    L.append(
                        "| %s_xla | %s | | | | |"
                        % (tool, "failed: " + probe if probe != "ran (no error)" else probe)
                    )
        if inproc.get("worker_error"):
            L.append("")
            L.append("In-process worker failed: %s" % inproc["worker_error"])
    if "floor_check" in results:
        L.append("")
        L.append(results["floor_check"])
    rec = results.get("record")
    if rec:
        L.append("")
        L.append("### Bytes written")
        L.append("")
        L.append(
            "Per logged row (`RecordWriter.write_row`, %d statistics; protocol 2 stores them as float32): %.0f bytes per site "
            "plus %.0f bytes per row; a row of the MLP's 42 sites is %.0f bytes, of 1,000 sites %.0f bytes. "
            "The site list is written once per tag (%.0f bytes of header for 1,000 sites)."
            % (
                rec["n_stats"],
                rec["per_site_per_row"],
                rec["per_row_fixed"],
                rec["row_bytes_42"],
                rec["row_bytes_1000"],
                rec["header_bytes_1000"],
            )
        )
    disk = results.get("disk")
    if disk:
        L.append("")
        d0 = next(iter(disk.values()))
        L.append(
            "Disk of a %d-step run (2 epochs x %d steps) of the MLP's layer structure%s, batch %d:"
            % (
                d0.get("steps", 0),
                d0.get("steps", 0) // 2,
                " (narrow 16-unit layers)" if a.get("narrow", True) else "",
                a["disk_batch"],
            )
        )
        L.append("")
        L.append("| tool | bytes | note |")
        L.append("|---|---|---|")
        notes = {
            "defaults": "10 rows (every 100 steps) + site list",
            "lean": "10 rows, fewer sites",
            "every10": "100 rows",
            "tb_hist": "weight histograms + epoch scalars + graph, once per epoch",
            "tb_plain": "TensorBoard() without histograms",
            "check_numerics": "writes nothing; raises at the first NaN/Inf",
            "dump_curt": "default circular_buffer_size=1000 (keeps the last 1,000 events)",
            "dump_concise": "default circular_buffer_size=1000",
            "dump_curt_all": "circular_buffer_size=-1 (every step kept)",
            "dump_concise_all": "circular_buffer_size=-1",
        }
        for tool, d in disk.items():
            if "bytes" in d:
                L.append("| %s | %s | %s |" % (tool, fmt_bytes(d["bytes"]), notes.get(tool, "")))
            else:
                L.append("| %s | failed: %s | |" % (tool, d.get("worker_error")))
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: few rounds, short epochs, no XLA on conv"
    )
    p.add_argument(
        "--out", help="update this markdown file (e.g. bench/RESULTS.md) with the tables"
    )
    p.add_argument("--models", default="mlp,conv,tiny")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="steps per timed epoch")
    p.add_argument(
        "--xla", default=None, help="models to also run with jit_compile=True (default mlp)"
    )
    p.add_argument("--skip", default="", help="comma list of phases to skip: inproc,global,disk")
    p.add_argument("--disk-batch", type=int, default=16)
    p.add_argument("--disk-steps", type=int, default=1000)
    p.add_argument("--wide-disk", action="store_true", help="disk runs on the real 1024-wide MLP")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument(
        "--render", metavar="JSON", help="only re-render the tables of an earlier --json file"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=90.0,
        help="seconds after a fit()'s first step before a configuration is declared too slow",
    )
    # worker arguments
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--configs", default="", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--tools", default="", help=argparse.SUPPRESS)
    p.add_argument("--probe-xla", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--narrow", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        sys.path.insert(0, ROOT)
        fn = {"inproc": worker_inproc, "global": worker_global, "disk": worker_disk}[args.worker]
        try:
            result = fn(args)
        finally:
            for d in _SCRATCH:
                shutil.rmtree(d, ignore_errors=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (TF + debugger atexit hooks); results are on disk

    if args.render:
        with open(args.render) as f:
            text = render(json.load(f))
        print(text)
        if args.out:
            update_results(args.out, text, "overhead")
        return

    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (12 if args.quick else 31)  # timed intervals per epoch = steps - 1
    xla_models = (args.xla if args.xla is not None else ("" if args.quick else "mlp")).split(",")
    skip = set(args.skip.split(","))
    t_start = time.perf_counter()
    results = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "command": " ".join(["python", "bench/overhead.py"] + sys.argv[1:]),
        "args": {
            "quick": args.quick,
            "rounds": rounds,
            "steps": steps,
            "disk_batch": args.disk_batch,
            "narrow": not args.wide_disk,
        },
        "models": {},
    }
    print("machine: %s" % results["machine"], flush=True)
    common = ["--rounds", str(rounds), "--steps", str(steps), "--budget", str(args.budget)]
    for model in [m for m in args.models.split(",") if m]:
        res = results["models"].setdefault(model, {})
        if "inproc" not in skip:
            configs = [c for c in INPROC if not c.endswith("_xla") or model in xla_models]
            if model == "tiny":
                configs = [c for c in configs if c.replace("_xla", "") in TINY_CONFIGS]
            if args.quick:
                configs = [c for c in configs if c != "lean_xla"]
            res["inproc"] = run_worker(
                ["--worker", "inproc", "--model", model, "--configs", ",".join(configs)] + common,
                timeout=1500,
            )
        if "global" not in skip and model != "tiny":
            for tool in GLOBAL_TOOLS:
                res[tool] = run_worker(
                    ["--worker", "global", "--model", model, "--tool", tool]
                    + (["--probe-xla"] if model in xla_models or model == "mlp" else [])
                    + common,
                    timeout=900,
                )
    if "disk" not in skip:
        disk_common = [
            "--disk-batch",
            str(args.disk_batch),
            "--disk-steps",
            str(args.disk_steps),
        ] + ([] if args.wide_disk else ["--narrow"])
        disk = run_worker(
            ["--worker", "disk", "--tools", "defaults,lean,every10,tb_hist"] + disk_common,
            timeout=900,
        )
        results["disk"] = {k: v for k, v in disk.items() if isinstance(v, dict)}
        if "worker_error" in disk:
            results["disk"]["nanwatch/tb"] = {"worker_error": disk["worker_error"]}
        dump_tools = ["dump_curt", "dump_concise"] + (
            [] if args.quick else ["dump_curt_all", "dump_concise_all"]
        )
        for tool in dump_tools:  # global: one process each
            d = run_worker(["--worker", "disk", "--tools", tool] + disk_common, timeout=600)
            results["disk"][tool] = d.get(tool, {"worker_error": d.get("worker_error")})
        results["disk"]["check_numerics"] = {"bytes": 0, "steps": args.disk_steps}
    results["record"] = record_sizes()
    results["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_start
    publish(results, render(results), args.json, args.out, "overhead")


if __name__ == "__main__":
    main()
