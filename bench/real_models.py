"""tb_nanwatch on real models: trace (first-step) time and step time against plain model.fit.

    .venv/bin/python bench/real_models.py                          # MobileNetV2 64x64 + Transformer, 3 processes each
    .venv/bin/python bench/real_models.py --models transformer --processes 2 --quick
    .venv/bin/python bench/real_models.py --out bench/RESULTS.md --json /tmp/real_models.json

Method:
* Each process builds the model once (seed 0) and trains it in alternating one-epoch fit()
  calls, plain (P) and with NanWatchCallback (N): P N P N ... or N P N P ..., the order
  alternating between processes so that neither is always traced first.  Plain and
  watched epochs keep their own traced train function (as Keras and the callback do
  across fit() calls), so only their first fit() traces.
* First step = from the fit() call to the end of its first batch (trace, graph
  optimisation and the first step itself), of each configuration's first fit().
  "Second fit()" = the first step of its next fit() minus that fit's median step: the
  extra a second fit() pays (plain Keras reuses its function; so must the callback).
* Step time = median of a fit()'s batch-to-batch intervals (the first dropped); the ratio
  is taken per pair of neighbouring epochs (N against the P right before or after it),
  and the figure is the median over all pairs with their min-max.
* Machines here are shared and have 2 cores: read ratios with the plain-vs-plain spread.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODELS = {
    # name: (batch, steps per epoch)
    "mobilenetv2": (16, 24),
    "transformer": (32, 24),
    "mlp": (128, 40),
}


def build(name):
    """(model, x, y) of a benchmark model, seed 0."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    batch, steps = MODELS[name]
    n = batch * steps
    rng = np.random.default_rng(0)
    if name == "mobilenetv2":
        model = keras.applications.MobileNetV2(input_shape=(64, 64, 3), weights=None, classes=10)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model, rng.normal(size=(n, 64, 64, 3)).astype("float32"), rng.integers(0, 10, n)
    if name == "transformer":
        model = transformer_classifier()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model, rng.integers(0, 20000, (n, 200)), rng.integers(0, 2, n)
    if name == "mlp":
        model = keras.Sequential(
            [keras.Input((784,))]
            + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
            + [keras.layers.Dense(10)]
        )
        model.compile(
            optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        return model, rng.normal(size=(n, 784)).astype("float32"), rng.integers(0, 10, n)
    raise ValueError(name)


def transformer_classifier(vocab=20000, maxlen=200, embed_dim=32, heads=2, ff_dim=32):
    """The keras.io "Text classification with Transformer" model."""
    import keras
    from keras import layers, ops

    class TransformerBlock(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.att = layers.MultiHeadAttention(num_heads=heads, key_dim=embed_dim)
            self.ffn = keras.Sequential(
                [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
            )
            self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
            self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
            self.dropout1 = layers.Dropout(0.1)
            self.dropout2 = layers.Dropout(0.1)

        def call(self, inputs, training=False):
            attn = self.dropout1(self.att(inputs, inputs), training=training)
            out1 = self.layernorm1(inputs + attn)
            return self.layernorm2(out1 + self.dropout2(self.ffn(out1), training=training))

    class TokenAndPositionEmbedding(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.token_emb = layers.Embedding(input_dim=vocab, output_dim=embed_dim)
            self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

        def call(self, x):
            positions = ops.arange(0, ops.shape(x)[-1], 1)
            return self.token_emb(x) + self.pos_emb(positions)

    inputs = layers.Input(shape=(maxlen,))
    x = TokenAndPositionEmbedding()(inputs)
    x = TransformerBlock()(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def worker(name, epochs, watched_first):
    """One process: alternating epochs; returns a list of per-fit() measurements."""
    import keras
    import numpy as np

    import tb_nanwatch

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float(
                logs["loss"]
            ) if logs and "loss" in logs else None  # a host sync, as a user's logging
            self.ends.append(time.perf_counter())

    model, x, y = build(name)
    batch, _ = MODELS[name]
    callback = tb_nanwatch.NanWatchCallback(tempfile.mkdtemp(prefix="nw_bench_"))
    functions = {"plain": None}
    out = []
    for epoch in range(epochs):
        config = ("nanwatch", "plain")[(epoch + (0 if watched_first else 1)) % 2]
        timer = Timer()
        model.train_function = functions["plain"] if config == "plain" else None
        start = time.perf_counter()
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=([callback] if config == "nanwatch" else []) + [timer],
        )
        if config == "plain":
            functions["plain"] = model.train_function
        intervals = np.diff(timer.ends)
        out.append(
            {
                "config": config,
                "epoch": epoch,
                "first_step_s": timer.ends[0] - start,
                "median_step_s": float(
                    np.median(intervals[1:] if len(intervals) > 1 else intervals)
                ),
                "sites": len(callback.watch.sites) if callback.watch else None,
            }
        )
    return out


def summarise(name, runs):
    import numpy as np

    by = {"plain": [], "nanwatch": []}
    firsts = {"plain": [], "nanwatch": []}
    seconds = {"plain": [], "nanwatch": []}
    ratios = []
    plain_pairs = []
    sites = None
    for run in runs:
        seen = set()
        for i, m in enumerate(run):
            by[m["config"]].append(m["median_step_s"])
            if m["config"] not in seen:
                firsts[m["config"]].append(m["first_step_s"])
                seen.add(m["config"])
            else:
                seconds[m["config"]].append(m["first_step_s"] - m["median_step_s"])
            if m["config"] == "nanwatch":
                sites = m["sites"]
                for j in (i - 1, i + 1):
                    if 0 <= j < len(run) and run[j]["config"] == "plain" and j > 1 and i > 1:
                        ratios.append(m["median_step_s"] / run[j]["median_step_s"])
        plains = [m["median_step_s"] for m in run if m["config"] == "plain"][1:]
        plain_pairs += [b / a for a, b in zip(plains, plains[1:])]

    def spread(values, fmt="%.2f"):
        if not values:
            return "-"
        return (fmt + " (" + fmt + "-" + fmt + ")") % (np.median(values), min(values), max(values))

    # A process's first fit() also pays the process's one-time costs, as a user's does: the
    # configuration traced first in each process is the fair, "fresh" figure.
    fresh = {c: [run[0]["first_step_s"] for run in runs if run[0]["config"] == c] for c in by}
    first_ratio = [n / p for n, p in zip(firsts["nanwatch"], firsts["plain"])]
    return {
        "model": name,
        "sites": sites,
        "first_step_plain_s": spread(firsts["plain"], "%.1f"),
        "first_step_nanwatch_s": spread(firsts["nanwatch"], "%.1f"),
        "first_step_ratio": spread(first_ratio),
        "fresh_first_step_plain_s": spread(fresh["plain"], "%.1f"),
        "fresh_first_step_nanwatch_s": spread(fresh["nanwatch"], "%.1f"),
        "fresh_first_step_ratio": "%.2f"
        % (np.median(fresh["nanwatch"]) / np.median(fresh["plain"]))
        if fresh["plain"] and fresh["nanwatch"]
        else "-",
        "second_fit_extra_plain_s": spread(seconds["plain"]),
        "second_fit_extra_nanwatch_s": spread(seconds["nanwatch"]),
        "step_plain_ms": spread([1e3 * v for v in by["plain"]], "%.0f"),
        "step_nanwatch_ms": spread([1e3 * v for v in by["nanwatch"]], "%.0f"),
        "step_ratio": spread(ratios),
        "plain_vs_plain": spread(plain_pairs),
        "pairs": len(ratios),
    }


def render(summaries, argv):
    cols = (
        "model",
        "sites",
        "fresh_first_step_plain_s",
        "fresh_first_step_nanwatch_s",
        "fresh_first_step_ratio",
        "first_step_plain_s",
        "first_step_nanwatch_s",
        "first_step_ratio",
        "second_fit_extra_plain_s",
        "second_fit_extra_nanwatch_s",
        "step_plain_ms",
        "step_nanwatch_ms",
        "step_ratio",
        "plain_vs_plain",
    )
    lines = [
        "Real models (`%s`, %s): median (min-max)."
        % (
            " ".join(["bench/real_models.py"] + argv),
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        ),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for s in summaries:
        lines.append("| " + " | ".join(str(s[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="mobilenetv2,transformer")
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6, help="alternating fit() calls per process")
    p.add_argument("--quick", action="store_true", help="4 epochs per process")
    p.add_argument("--out", help="update this markdown file (e.g. bench/RESULTS.md)")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--watched-first", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    epochs = 4 if args.quick else args.epochs
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, epochs, args.watched_first)))
        return
    from results_md import publish

    raw, summaries = {}, []
    for name in args.models.split(","):
        runs = []
        for i in range(args.processes):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                name,
                "--epochs",
                str(epochs),
            ]
            if i % 2:
                cmd.append("--watched-first")
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            )
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit("worker %s failed" % name)
            runs.append(json.loads(line[-1][7:]))
            print(
                name,
                i,
                [
                    (m["config"][0], round(m["first_step_s"], 1), round(1e3 * m["median_step_s"]))
                    for m in runs[-1]
                ],
                flush=True,
            )
        raw[name] = runs
        summaries.append(summarise(name, runs))
    publish(raw, render(summaries, sys.argv[1:]), args.json, args.out, "real_models")


if __name__ == "__main__":
    main()
