"""Two trainings that crashed inside tb_nanwatch's writer (not Keras), found while writing
fresh3_cases.py and left out of that batch (a scored case must not crash); both are fixed:

- `adafactor`: keras.optimizers.Adafactor keeps int32 placeholder variables for the factored
  moments of 1-D weights; the initial snapshot ran IsFinite on them (InvalidArgumentError).
  Now such slots are not sites: it trains (tests/test_models.py, case `adafactor`).
- `accumulation`: a custom train_step that takes one GradientTape per micro-batch and applies
  the averaged gradients once, on a subclassed model not built before fit: its first trace
  applies an empty gradient list, and the writer raised IndexError in a gradient getter. Now
  it fails with Keras' own error, as plain fit does (tests/test_custom_steps.py).

    .venv/bin/python bench/eval_causes/fresh3_writer_crashes.py   # prints each case's outcome
    .venv/bin/python bench/eval_causes/fresh3_writer_crashes.py --plain   # without the callback
"""

import sys
import tempfile
import traceback


def adafactor(callbacks):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4)).astype("float32")
    y = x[:, :1]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adafactor(1e-3), "mse")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=callbacks)


def accumulation(callbacks):
    import keras
    import numpy as np
    import tensorflow as tf

    class Accumulating(keras.Model):
        def __init__(self, micro=4):
            super().__init__()
            self.micro = micro
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.hidden(x))

        def train_step(self, data):
            x, y = data
            total = [tf.zeros_like(v) for v in self.trainable_variables]
            for xm, ym in zip(tf.split(x, self.micro), tf.split(y, self.micro)):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(self(xm, training=True) - ym))
                grads = tape.gradient(loss, self.trainable_variables)
                total = [t + g / self.micro for t, g in zip(total, grads)]
            self.optimizer.apply(total, self.trainable_variables)
            return {"loss": loss}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4)).astype("float32")
    model = Accumulating()
    model.compile(keras.optimizers.SGD(0.01))
    model.fit(x, x[:, :1], epochs=1, batch_size=32, verbose=0, callbacks=callbacks)


def main(argv=None):
    plain = "--plain" in (argv if argv is not None else sys.argv[1:])
    for fn in (adafactor, accumulation):
        import tb_nanwatch

        callbacks = [] if plain else [tb_nanwatch.NanWatchCallback(tempfile.mkdtemp())]
        try:
            fn(callbacks)
            print("%-13s trains" % fn.__name__)
        except Exception as e:
            last = traceback.extract_tb(e.__traceback__)[-1]
            print(
                "%-13s %s: %s (at %s:%d)"
                % (fn.__name__, type(e).__name__, str(e).splitlines()[0][:120], last[0], last[1])
            )


if __name__ == "__main__":
    main()
