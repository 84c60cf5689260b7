"""tb_nanwatch on one GPU: step time, first step and memory against plain model.fit.

    bash bench/gpu_check.sh                # makes its venv, then runs this on the GPU
    python bench/gpu_check.py --cpu-smoke  # tiny sizes on the CPU: proves the script works
    python bench/gpu_check.py --models resnet50,gpt2 --json out.json

Models (each measured in a process of its own, against its own plain run in that process):
* resnet50: keras.applications.ResNet50(weights=None), 224x224x3, batch 32 (jit_compile off);
* gpt2: keras_hub.models.GPT2Backbone built from GPT-2 small's config (no preset, no download)
  plus a Dense LM head over the vocabulary, sequence 128, batch 8 (jit_compile off);
* transformer_xla: the keras.io text-classification Transformer (bench/real_models.py), compiled
  with jit_compile=True.

Method, per model (one model object, its plain and watched train functions kept across fit()
calls, as Keras and the callback keep them):
1. a plain fit() that pays the process's one-time costs (CUDA context, autotuning), not compared;
2. the plain train function traced again ("first step plain": fit() call to the end of its first
   batch), then the watched one (NanWatchCallback, record mode) and, when this tb_nanwatch has
   `on_nonfinite="stop"`, the stop mode: each a "first step" in the same warmed-up process;
3. ROUNDS rounds of plain / record [/ stop] fit() calls: step time = median batch-to-batch
   interval of a fit() (its first batch dropped); the ratio is taken per round against that
   round's plain fit, and the figure is the median over rounds (with min-max), next to the
   plain-vs-plain spread of neighbouring rounds;
4. memory: tf.config.experimental.get_memory_info("GPU:0")["peak"], reset before each fit() of
   the rounds; "added" is the watched peak minus the plain peak (median over rounds).
Every batch ends with a host read of the loss (as a user's logging does), in every
configuration, so asynchronous GPU execution cannot hide a step's time.
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = ("resnet50", "gpt2", "transformer_xla")
# name: (batch, steps per fit) at GPU size and at smoke size
SIZES = {
    "resnet50": {"gpu": (32, 20), "smoke": (4, 4)},
    "gpt2": {"gpu": (8, 20), "smoke": (2, 4)},
    "transformer_xla": {"gpu": (64, 20), "smoke": (8, 4)},
}
ROUNDS = {"gpu": 3, "smoke": 2}
GPT2_SMALL = dict(
    vocabulary_size=50257,
    num_layers=12,
    num_heads=12,
    hidden_dim=768,
    intermediate_dim=3072,
    max_sequence_length=1024,
)
GPT2_TINY = dict(
    vocabulary_size=512,
    num_layers=2,
    num_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    max_sequence_length=64,
)


def build(name, smoke):
    """(model, x, y, batch, steps) of a model, seed 0, compiled."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch, steps = SIZES[name]["smoke" if smoke else "gpu"]
    n = batch * steps
    if name == "resnet50":
        side, classes = (32, 10) if smoke else (224, 1000)
        model = keras.applications.ResNet50(
            weights=None, input_shape=(side, side, 3), classes=classes
        )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False)
        x = rng.normal(size=(n, side, side, 3)).astype("float32")
        return model, x, rng.integers(0, classes, n), batch, steps
    if name == "gpt2":
        import keras_hub

        config = GPT2_TINY if smoke else GPT2_SMALL
        seq = 16 if smoke else 128
        backbone = keras_hub.models.GPT2Backbone(**config)
        token_ids = keras.Input((seq,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((seq,), dtype="int32", name="padding_mask")
        hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
        logits = keras.layers.Dense(config["vocabulary_size"], name="lm_head")(hidden)
        model = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits)
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        tokens = rng.integers(0, config["vocabulary_size"], (n, seq + 1)).astype("int32")
        x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, seq), "int32")}
        return model, x, tokens[:, 1:], batch, steps
    if name == "transformer_xla":
        import real_models

        vocab, maxlen = (1000, 32) if smoke else (20000, 200)
        model = real_models.transformer_classifier(vocab=vocab, maxlen=maxlen)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
        return model, rng.integers(0, vocab, (n, maxlen)), rng.integers(0, 2, n), batch, steps
    raise ValueError("unknown model %r; one of %s" % (name, ", ".join(MODELS)))


def stop_mode_supported():
    """True when this tb_nanwatch's callback takes on_nonfinite="stop"."""
    import tb_nanwatch

    return "on_nonfinite" in inspect.signature(tb_nanwatch.NanWatchCallback).parameters


def _gpu_memory(reset=False):
    """{"current", "peak"} bytes on GPU:0, or None without a GPU (or memory stats)."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    try:
        if reset:
            tf.config.experimental.reset_memory_stats("GPU:0")
        return tf.config.experimental.get_memory_info("GPU:0")
    except (ValueError, RuntimeError):
        return None


def worker(name, smoke):
    """Measures one model in this process; returns a dict of raw figures."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tb_nanwatch

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            if logs and "loss" in logs:
                float(logs["loss"])  # a host read of the loss: the step has run
            self.ends.append(time.perf_counter())

    t_build = time.perf_counter()
    model, x, y, batch, steps = build(name, smoke)
    build_s = time.perf_counter() - t_build
    logdir = tempfile.mkdtemp(prefix="nw_gpu_check_")
    configs = {"plain": [], "record": [tb_nanwatch.NanWatchCallback(os.path.join(logdir, "rec"))]}
    if stop_mode_supported():
        configs["stop"] = [
            tb_nanwatch.NanWatchCallback(os.path.join(logdir, "stop"), on_nonfinite="stop")
        ]
    functions = {}

    def fit(config, fresh_trace=False):
        timer = Timer()
        if fresh_trace:
            model.train_function = None
        else:
            model.train_function = functions.get(config)
        _gpu_memory(reset=True)
        start = time.perf_counter()
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=configs[config] + [timer],
        )
        memory = _gpu_memory()
        functions[config] = model.train_function
        intervals = np.diff(timer.ends)
        return {
            "first_step_s": timer.ends[0] - start,
            "median_step_s": float(np.median(intervals[1:] if len(intervals) > 1 else intervals)),
            "peak_bytes": None if memory is None else int(memory["peak"]),
        }

    warmup = fit("plain", fresh_trace=True)  # the process's one-time costs
    first = {config: fit(config, fresh_trace=True) for config in configs}
    rounds = [{config: fit(config) for config in configs} for _ in range(ROUNDS[_size(smoke)])]
    watch = configs["record"][0].watch
    return {
        "model": name,
        "batch": batch,
        "steps_per_fit": steps,
        "params": int(model.count_params()),
        "sites": len(watch.sites) if watch is not None else None,
        "device": "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU",
        "build_s": build_s,
        "warmup": warmup,
        "first": first,
        "rounds": rounds,
        "stop_mode": "stop" in configs,
    }


def _size(smoke):
    return "smoke" if smoke else "gpu"


def summarise(raw):
    """The figures of one model from its worker's raw measurements."""
    import numpy as np

    def spread(values, fmt="%.2f"):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return fmt % values[0]
        return (fmt + " (" + fmt + "-" + fmt + ")") % (np.median(values), min(values), max(values))

    rounds = raw["rounds"]
    plain = [r["plain"]["median_step_s"] for r in rounds]
    out = {
        "model": raw["model"],
        "device": raw["device"],
        "params": raw["params"],
        "sites": raw["sites"],
        "batch": raw["batch"],
        "step_plain_ms": spread([1e3 * p for p in plain], "%.1f"),
        "plain_vs_plain": spread([b / a for a, b in zip(plain, plain[1:])]),
        "first_step_plain_s": "%.1f" % raw["first"]["plain"]["first_step_s"],
    }
    for mode in ("record", "stop"):
        if mode not in raw["first"]:
            out["step_ratio_" + mode] = out["first_step_ratio_" + mode] = None
            continue
        out["step_ratio_" + mode] = spread(
            [r[mode]["median_step_s"] / r["plain"]["median_step_s"] for r in rounds]
        )
        out["first_step_%s_s" % mode] = "%.1f" % raw["first"][mode]["first_step_s"]
        out["first_step_ratio_" + mode] = "%.2f" % (
            raw["first"][mode]["first_step_s"] / raw["first"]["plain"]["first_step_s"]
        )
    peaks = [
        (r["plain"]["peak_bytes"], r["record"]["peak_bytes"])
        for r in rounds
        if r["plain"]["peak_bytes"] is not None
    ]
    if peaks:
        out["peak_plain_mb"] = "%.0f MB" % (np.median([p for p, _ in peaks]) / 2**20)
        out["memory_added_mb"] = "%.1f MB" % (np.median([w - p for p, w in peaks]) / 2**20)
    else:
        out["peak_plain_mb"] = out["memory_added_mb"] = "n/a (CPU)"
    return out


def render(summaries, elapsed, smoke, stop_note):
    header = (
        "| model | device | sites | plain step | step ratio record | step ratio stop "
        "| plain vs plain | first step plain | first-step ratio record | first-step ratio stop "
        "| peak plain | memory added |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for s in summaries:
        if "error" in s:
            lines.append("| %s | failed: %s |" % (s["model"], s["error"]))
            continue
        lines.append(
            "| %s | %s | %s | %s ms | %s | %s | %s | %s s | %s | %s | %s | %s |"
            % (
                s["model"],
                s["device"],
                s["sites"],
                s["step_plain_ms"],
                s["step_ratio_record"],
                s["step_ratio_stop"] or "skipped",
                s["plain_vs_plain"],
                s["first_step_plain_s"],
                s["first_step_ratio_record"],
                s["first_step_ratio_stop"] or "skipped",
                s["peak_plain_mb"],
                s["memory_added_mb"],
            )
        )
    lines.append("")
    lines.append(
        "%s; %.0f s in all.%s"
        % (
            "CPU smoke (tiny sizes: proves the script runs, the figures mean nothing)"
            if smoke
            else "one GPU",
            elapsed,
            "" if not stop_note else " " + stop_note,
        )
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        default=os.environ.get("GPU_CHECK_CPU_SMOKE") == "1",
        help="tiny sizes on the CPU (no GPU needed); also GPU_CHECK_CPU_SMOKE=1",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of: %s" % ", ".join(MODELS)
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw and summarised figures")
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.cpu_smoke:
            os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
        json.dump(worker(args.worker, args.cpu_smoke), sys.stdout)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error("unknown model(s) %s; one of %s" % (", ".join(unknown), ", ".join(MODELS)))
    env = dict(os.environ)
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    else:
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if check.returncode != 0 or check.stdout.strip().splitlines()[-1:] in ([], ["0"]):
            print(
                "gpu_check: TensorFlow sees no GPU (%s); run with --cpu-smoke to check the script "
                "on the CPU" % (check.stdout.strip() or check.stderr.strip()[-500:]),
                file=sys.stderr,
            )
            return 2
    stop_note = (
        ""
        if _stop_supported_here()
        else 'Stop mode skipped: this tb_nanwatch has no NanWatchCallback(on_nonfinite="stop").'
    )
    t0 = time.perf_counter()
    raws, summaries = [], []
    for name in models:
        started = time.perf_counter()
        print("gpu_check: %s ..." % name, file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", name]
            + (["--cpu-smoke"] if args.cpu_smoke else []),
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["exit status %d" % proc.returncode]
            print(proc.stderr[-4000:], file=sys.stderr)
            summaries.append({"model": name, "error": tail[0]})
            continue
        raw = json.loads(proc.stdout.strip().splitlines()[-1])
        raws.append(raw)
        summaries.append(summarise(raw))
        print(
            "gpu_check: %s done in %.0f s" % (name, time.perf_counter() - started),
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - t0
    print(render(summaries, elapsed, args.cpu_smoke, stop_note))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "smoke": args.cpu_smoke,
                    "elapsed_s": elapsed,
                    "summaries": summaries,
                    "raw": raws,
                },
                f,
                indent=1,
            )
    return 1 if any("error" in s for s in summaries) else 0


def _stop_supported_here():
    try:
        return stop_mode_supported()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
