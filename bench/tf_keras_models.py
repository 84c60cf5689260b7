"""tb_nanwatch on tf_keras (Keras 2) application models: right producer, bitwise plain fit, times.

    .venv/bin/pip install --no-deps "tf_keras==2.21.*"       # once (make setup does it)
    .venv/bin/python bench/tf_keras_models.py                          # mobilenetv2, resnet50
    .venv/bin/python bench/tf_keras_models.py --models mobilenetv2 --json /tmp/tfk.json

Per model (weights=None, 32x32x3 inputs, 10 classes, Adam, sparse categorical cross-entropy,
seed 0, op determinism on), in one process, three trainings of `steps` steps on the same data:
plain fit twice (is plain fit itself reproducible bit for bit?) and fit with NanWatchCallback.
In each, at the start of step `inject`, a probe snapshots every model and optimizer variable
(bitwise comparison: training so far) and then writes a NaN into one element of the target
layer's kernel.  The ground truth for the first non-finite value is that step and the target
layer's activation (its inputs are finite, its output is not).  Reported: sites, the record,
differing arrays (plain vs plain, plain vs watched), first step (trace + first step) and the
median step time of each training.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

MODELS = {
    # name: (constructor, target layer for the NaN, batch)
    "mobilenetv2": ("MobileNetV2", "block_3_project", 16),
    "resnet50": ("ResNet50", "conv3_block1_1_conv", 16),
}


def make_probe(tf_keras, target, inject):
    """The probe callback (a tf_keras callback: tf_keras is imported only when the script runs)."""

    class _Probe(tf_keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.snapshot = None
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.times.append(time.perf_counter())
            if self.step == inject:
                variables = self.model.variables + list(self.model.optimizer.variables)
                self.snapshot = [v.numpy().tobytes() for v in variables]
                kernel = self.model.get_layer(target).kernel
                value = kernel.numpy()
                value.flat[0] = np.nan
                kernel.assign(value)

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            self.times.append(time.perf_counter())

    return _Probe()


def run_model(name, steps, inject, logdir):
    import tensorflow as tf
    import tf_keras

    import tb_nanwatch

    tf.config.experimental.enable_op_determinism()
    constructor, target, batch = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, batch * steps)

    def train(watched):
        tf_keras.utils.set_random_seed(0)
        model = getattr(tf_keras.applications, constructor)(
            input_shape=(32, 32, 3), weights=None, classes=10
        )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        probe = make_probe(tf_keras, target, inject)
        callbacks = [probe]
        if watched:
            callbacks.insert(0, tb_nanwatch.NanWatchCallback(os.path.join(logdir, name)))
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        total = time.perf_counter() - t0
        ends = probe.times[1::2]
        first_step = ends[0] - t0 if ends else None
        intervals = np.diff(ends[1:inject]) if inject > 3 else np.diff(ends[1:])
        return {
            "model": model,
            "snapshot": probe.snapshot,
            "first_step_s": round(first_step, 2),
            "median_step_ms": round(float(np.median(intervals)) * 1000, 1),
            "total_s": round(total, 1),
            "watch": callbacks[0].watch if watched else None,
        }

    plain = train(False)
    plain2 = train(False)
    watched = train(True)

    def differing(a, b):
        return sum(p != q for p, q in zip(a, b)) if len(a) == len(b) else "different variables"

    record = watched["watch"].first_nonfinite
    return {
        "model": name,
        "layers": len(plain["model"].layers),
        "sites": len(watched["watch"].sites),
        "variables_compared": len(plain["snapshot"]),
        "differ_plain_vs_plain": differing(plain["snapshot"], plain2["snapshot"]),
        "differ_plain_vs_watched": differing(plain["snapshot"], watched["snapshot"]),
        "record": None
        if record is None
        else {k: record[k] for k in ("step", "layer", "kind", "tensor", "nan", "posinf")},
        "expected": {"step": inject, "layer": target, "kind": "activation"},
        "right": record is not None
        and (record["step"], record["layer"], record["kind"]) == (inject, target, "activation"),
        "first_step_s": {"plain": plain["first_step_s"], "watched": watched["first_step_s"]},
        "median_step_ms": {
            "plain": plain["median_step_ms"],
            "plain2": plain2["median_step_ms"],
            "watched": watched["median_step_ms"],
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenetv2,resnet50")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--inject", type=int, default=8)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = []
    with tempfile.TemporaryDirectory() as logdir:
        for name in args.models.split(","):
            result = run_model(name, args.steps, args.inject, logdir)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["right"] and r["differ_plain_vs_watched"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
