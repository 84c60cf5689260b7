"""Where stop mode's cost under XLA lies, on the MLP (jit_compile=True), in CPU time per step.

    for mode in record stop norestore; do .venv/bin/python bench/stop_mode_xla_parts.py $mode; done

record: on_nonfinite="record"; stop: on_nonfinite="stop"; norestore: stop mode with the
snapshots taken but no restore `If` (a diagnostic: it does not roll anything back).  One process
per mode, 6 epochs of 40 steps after the traced one; median over epochs of the median step.
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tb_nanwatch  # noqa: E402
from tb_nanwatch.watch import guard  # noqa: E402

mode = sys.argv[1]
if mode == "norestore":
    guard.Snapshots.restore_if = lambda self, pred: None
rng = np.random.default_rng(0)
x = rng.normal(size=(40 * 128, 784)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 10, 40 * 128), 10)


class T(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.cpu, self.prev = [], None

    def on_train_batch_end(self, b, logs=None):
        float(logs.get("loss", 0))
        now = time.process_time()
        if self.prev is not None:
            self.cpu.append(now - self.prev)
        self.prev = now


def build():
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(10, activation="softmax")]
    )
    m.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
    return m


m = build()
t = T()
cb = tb_nanwatch.NanWatchCallback(
    tempfile.mkdtemp(), on_nonfinite="record" if mode == "record" else "stop"
)
m.fit(x, y, batch_size=128, verbose=0, callbacks=[cb, t])
meds = []
for r in range(6):
    m.fit(x, y, batch_size=128, verbose=0, callbacks=[cb, t])
    meds.append(statistics.median(t.cpu) * 1000)
print(
    mode,
    "cpu ms/step median over rounds",
    round(statistics.median(meds), 2),
    [round(v, 1) for v in meds],
)
