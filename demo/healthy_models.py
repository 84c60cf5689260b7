"""Healthy real models get no cause and no early warning: a small Transformer, a CNN and an LSTM.

    python demo/healthy_models.py [--logdir /tmp/healthy] [--steps 300]

Trains each model on a learnable synthetic task with `NanWatchCallback` (every site,
`log_every=10`, the writer's own early-warning detector on at every step), then prints what
`tb-nanwatch report --json` says: the first non-finite value, the diagnosis and the early
warning.  Exit status 0 when all three are finite with no cause and no warning, 1 otherwise.
Too slow for the test suite (tracing the instrumented Transformer alone takes about 40 s on
a 2-core CPU); demo/README.md gives the result.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))


def transformer(keras, vocab=200, length=32, dim=32):
    """keras.io's Transformer text classifier, scaled down: token + position embedding,
    one multi-head attention block with a feed-forward net, pooled into a softmax."""
    inputs = keras.Input((length,), dtype="int32")
    tokens = keras.layers.Embedding(vocab, dim)(inputs)
    positions = keras.layers.Embedding(length, dim)(keras.ops.arange(length))
    x = tokens + positions
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=dim // 2)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dropout(0.1)(attention))
    ffn = keras.layers.Dense(dim)(keras.layers.Dense(64, activation="relu")(x))
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dropout(0.1)(ffn))
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.Dense(16, activation="relu")(x)
    )
    return keras.Model(inputs, outputs, name="transformer")


def transformer_data(np, n, vocab=200, length=32):
    x = np.random.randint(0, vocab, size=(n, length))
    y = (np.sum(x < vocab // 2, axis=1) > length // 2).astype(
        "int32"
    )  # more small tokens than large
    return x, y


def cnn(keras):
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="cnn",
    )


def cnn_data(np, n):
    y = np.random.randint(0, 10, n)
    x = np.random.normal(size=(n, 28, 28, 1)).astype("float32") * 0.3
    for k in range(10):  # class k: a bright bar at row 2k+4
        x[y == k, 2 * k + 4, 4:24, 0] += 2.0
    return x, y


def lstm(keras):
    return keras.Sequential(
        [keras.Input((20, 4)), keras.layers.LSTM(32), keras.layers.Dense(1)], name="lstm"
    )


def lstm_data(np, n):
    x = np.random.normal(size=(n, 20, 4)).astype("float32")
    y = x[:, :, 0].sum(axis=1, keepdims=True) * 0.2  # a running sum: the LSTM has to remember
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="/tmp/tb_nanwatch_healthy_models")
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps per model (batch 32)"
    )
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import tb_nanwatch

    n = args.steps * 32
    models = [
        ("transformer", transformer, transformer_data, "adam", "sparse_categorical_crossentropy"),
        ("cnn", lambda k: cnn(k), cnn_data, "adam", "sparse_categorical_crossentropy"),
        ("lstm", lambda k: lstm(k), lstm_data, "adam", "mse"),
    ]
    for name, build, data, optimizer, loss in models:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        x, y = data(np, n)
        model = build(keras)
        model.compile(optimizer=optimizer, loss=loss)
        t0 = time.perf_counter()
        history = model.fit(
            x,
            y,
            batch_size=32,
            epochs=1,
            verbose=0,
            callbacks=[tb_nanwatch.NanWatchCallback(os.path.join(args.logdir, name), log_every=10)],
        )
        print(
            "%-12s trained %d steps in %.0f s, loss %.3f"
            % (name, args.steps, time.perf_counter() - t0, history.history["loss"][-1]),
            flush=True,
        )
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", args.logdir, "--json"],
        capture_output=True,
        text=True,
    )
    runs = json.loads(proc.stdout)["runs"]
    ok = True
    for r in runs:
        clean = r["first_nonfinite"] is None and r["diagnosis"] == [] and r["early_warning"] is None
        ok &= clean
        print(
            "%-12s %s  diagnosis %s  early warning %s  (%d steps watched)"
            % (
                r["run"],
                "finite" if r["first_nonfinite"] is None else "NON-FINITE",
                [d["cause"] for d in r["diagnosis"]] or "[]",
                r["early_warning"],
                r["steps_watched"],
            )
        )
    return 0 if ok and len(runs) == len(models) else 1


if __name__ == "__main__":
    sys.exit(main())
