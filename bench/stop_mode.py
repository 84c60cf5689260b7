"""What stop mode costs per step against record mode, on the 784-1024x3-10 MLP (batch 128).

    .venv/bin/python bench/stop_mode.py                          # ~3 min on 2 cores
    .venv/bin/python bench/stop_mode.py --xla                    # also under jit_compile=True
    .venv/bin/python bench/stop_mode.py --out bench/RESULTS.md --json bench/out/stop_mode.json
    .venv/bin/python bench/stop_mode.py --render bench/out/stop_mode.json --out bench/RESULTS.md

Method (as bench/overhead.py): three copies of the same model (same seed) -- plain fit,
NanWatchCallback(on_nonfinite="record") and NanWatchCallback(on_nonfinite="stop") -- each
traced in a first fit() (not timed), then R rounds; in every round each configuration runs one
epoch of --steps steps, the order alternating forward and backward (A B C, C B A, ...).  A
timing callback, last, takes the time at each batch end after a host sync on the loss; the
first interval of each fit() is dropped.  Per epoch the median interval; per round the ratios
stop/record and record/plain; reported: the median over rounds and the min-max.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from results_md import publish  # bench/ is the script's directory

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
BATCH = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--xla", action="store_true", help="also measure jit_compile=True")
    parser.add_argument(
        "--model",
        default="mlp",
        choices=("mlp", "mobilenetv2"),
        help="mlp: 784-1024x3-10 at batch 128; mobilenetv2: 64x64, batch 16 (bench/real_models.py)",
    )
    parser.add_argument("--out", help="update this RESULTS.md")
    parser.add_argument("--json", help="save the raw numbers here")
    parser.add_argument("--render", help="redo the table from this --json file, without running")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        publish(results, render(results), None, args.out, section_name(results.get("model")))
        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import tb_nanwatch

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.wall, self.cpu, self._prev = [], [], None

        def on_train_batch_end(self, batch, logs=None):
            float((logs or {}).get("loss", 0.0))  # host sync
            now, cpu = time.perf_counter(), time.process_time()
            if self._prev is not None:
                self.wall.append(now - self._prev[0])
                self.cpu.append(cpu - self._prev[1])
            self._prev = (now, cpu)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.steps * BATCH, 784)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, args.steps * BATCH), 10)
    batch = BATCH
    if args.model == "mobilenetv2":
        import real_models

        batch = real_models.MODELS["mobilenetv2"][0]
        n = batch * args.steps
        x = rng.normal(size=(n, 64, 64, 3)).astype("float32")
        y = rng.integers(0, 10, n)

    def build(jit):
        if args.model == "mobilenetv2":
            keras.utils.set_random_seed(0)
            model = keras.applications.MobileNetV2(
                input_shape=(64, 64, 3), weights=None, classes=10
            )
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=jit)
            return model
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((784,))]
            + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
            + [keras.layers.Dense(10, activation="softmax")]
        )
        model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=jit)
        return model

    scratch = tempfile.mkdtemp(prefix="nanwatch_stop_bench.")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": "%s, %d cores, Python %s"
        % (platform.machine(), os.cpu_count(), platform.python_version()),
        "steps": args.steps,
        "model": args.model,
        "batch": BATCH if args.model == "mlp" else 16,
        "rounds": args.rounds,
        "sections": {},
    }
    results["load_before"] = os.getloadavg()[0]
    for jit in [False, True] if args.xla else [False]:
        configs = {}
        for name in ("plain", "record", "stop"):
            model = build(jit)
            callbacks = []
            if name != "plain":
                callbacks.append(
                    tb_nanwatch.NanWatchCallback(
                        os.path.join(scratch, "%s_%s" % (name, jit)), on_nonfinite=name
                    )
                )
            timer = StepTimer()
            t0 = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks + [timer])
            configs[name] = (model, callbacks + [timer], timer, time.perf_counter() - t0)
        order = list(configs)
        per_round = {name: [] for name in order}
        cpu_round = {name: [] for name in order}
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                model, callbacks, timer, _ = configs[name]
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
                per_round[name].append(statistics.median(timer.wall))
                cpu_round[name].append(statistics.median(timer.cpu))
        ratios = {
            "stop/record": [s / r for s, r in zip(per_round["stop"], per_round["record"])],
            "record/plain": [r / p for r, p in zip(per_round["record"], per_round["plain"])],
            "stop/plain": [s / p for s, p in zip(per_round["stop"], per_round["plain"])],
            "cpu stop/record": [s / r for s, r in zip(cpu_round["stop"], cpu_round["record"])],
        }
        results["sections"]["xla" if jit else "graph"] = {
            "step_ms": {n: [1000 * v for v in per_round[n]] for n in order},
            "first_fit_s": {n: configs[n][3] for n in order},
            "ratios": ratios,
        }
    results["load_after"] = os.getloadavg()[0]
    publish(
        results,
        render(results),
        args.json,
        args.out,
        section_name(args.model),
    )


def section_name(model):
    """RESULTS.md's generated section of a model's figures."""
    return "stop_mode" if model in (None, "mlp") else "stop_mode_" + model


def render(results):
    lines = [
        "Stop mode vs record mode, %s, Adam (%s; %s; %d rounds of %d "
        "steps; load average %.1f before, %.1f after). Command: `.venv/bin/python bench/stop_mode.py "
        "--rounds %d --steps %d%s%s --out bench/RESULTS.md`"
        % (
            "MobileNetV2 64x64, batch 16"
            if results.get("model") == "mobilenetv2"
            else "784-1024x3-10 MLP, batch 128",
            results["date"],
            results["machine"],
            results["rounds"],
            results["steps"],
            results["load_before"],
            results["load_after"],
            results["rounds"],
            results["steps"],
            " --xla" if "xla" in results["sections"] else "",
            " --model mobilenetv2" if results.get("model") == "mobilenetv2" else "",
        ),
        "",
        "| train function | plain ms/step | record ms/step | stop ms/step | stop / record | record / plain | stop / plain | CPU time stop / record |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(values):
        return "%.3fx (%.3f-%.3f)" % (statistics.median(values), min(values), max(values))

    for section, data in results["sections"].items():
        ms = {n: statistics.median(v) for n, v in data["step_ms"].items()}
        lines.append(
            "| %s | %.1f | %.1f | %.1f | %s | %s | %s | %s |"
            % (
                "jit_compile=True" if section == "xla" else "tf.function",
                ms["plain"],
                ms["record"],
                ms["stop"],
                fmt(data["ratios"]["stop/record"]),
                fmt(data["ratios"]["record/plain"]),
                fmt(data["ratios"]["stop/plain"]),
                fmt(data["ratios"]["cpu stop/record"]),
            )
        )
    lines.append("")
    lines.append(
        "Ratios: median over rounds of the per-round ratio of median step times (min-max in brackets)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
