"""Mechanism checks for the fresh3_cases.py cases that name exploding gradients or a learning
rate too high, independent of tb_nanwatch's diagnosis (plain Keras and run_eval's batch counter):

- the gradient norm w.r.t. each hidden layer's output at the initial weights, on the first batch:
  the ratio first / last hidden layer (growth layer over layer backward), and the RMS of the
  first and last hidden outputs;
- the same training with the learning rate divided by 10 and by 100: an exploding gradient still
  blows up at a sane (lower) rate; a learning rate that is too high does not;
- for the optimizer_state_overflow cases, the loss and the largest |gradient| on the first batch
  at the initial weights: finite, and above sqrt(float32 max) = 1.8e19, so g^2 overflows in the
  slot while the gradient it is built from is finite.

    .venv/bin/python bench/eval_causes/fresh3_mechanisms.py
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fresh3_cases  # noqa: E402
import run_eval  # noqa: E402

NAMES = [
    "grad_transformer_without_layernorm",
    "grad_residual_separable_no_bn",
    "lr_depthwise_polynomial",
    "lr_momentum_steps_per_execution",
]


def gradient_profile(model, x, y):
    import keras
    import numpy as np
    import tensorflow as tf

    hidden = [
        layer
        for layer in model.layers
        if isinstance(
            layer,
            (
                keras.layers.Add,
                keras.layers.Dense,
                keras.layers.Conv1D,
                keras.layers.Conv2D,
                keras.layers.DepthwiseConv2D,
                keras.layers.SeparableConv2D,
            ),
        )
    ][:-1]
    probe = keras.Model(model.inputs, [layer.output for layer in hidden] + [model.outputs[0]])
    xb = [a[:32] for a in x] if isinstance(x, (list, tuple)) else x[:32]
    with tf.GradientTape() as tape:
        outs = probe(xb)
        for o in outs[:-1]:
            tape.watch(o)
        outs = probe(xb)
        loss = tf.reduce_mean(tf.square(outs[-1] - y[:32]))
    grads = tape.gradient(loss, outs[:-1])
    norms = [float(tf.norm(g)) if g is not None else float("nan") for g in grads]
    rms = [float(np.sqrt(np.mean(np.square(o)))) for o in outs[:-1]]
    return norms, rms


SLOT_NAMES = ["slot_amsgrad_fixed_sigma", "slot_rmsprop_inverse_target_variance"]


def slot_gradients():
    import keras
    import tensorflow as tf

    saved = fresh3_cases._fit
    for name in SLOT_NAMES:
        c = next(c for c in fresh3_cases.CASES if c.name == name)
        got = {}

        def probe(model, x, y=None, logdir=None, callbacks=(), **kw):
            first = lambda a: [v[:32] for v in a] if isinstance(a, (list, tuple)) else a[:32]  # noqa: E731
            xb, yb = first(x), first(y)
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            got["loss"] = float(loss)
            got["gmax"] = max(float(tf.reduce_max(tf.abs(g))) for g in grads)

        fresh3_cases._fit = probe
        try:
            keras.utils.set_random_seed(1234)
            c.fn(None, [])
        finally:
            fresh3_cases._fit = saved
        print(
            "%-38s loss %.3g, largest |gradient| %.3g: finite %s, g^2 above float32's max %s"
            % (name, got["loss"], got["gmax"], got["gmax"] < float("inf"), got["gmax"] > 1.8e19),
            flush=True,
        )


def main():
    saved = fresh3_cases._fit
    for name in NAMES:
        c = next(c for c in fresh3_cases.CASES if c.name == name)
        profile = {}

        def probe_fit(model, x, y=None, logdir=None, callbacks=(), **kw):
            if not hasattr(x, "element_spec"):
                profile["norms"], profile["rms"] = gradient_profile(model, x, y)
            return saved(model, x, y, logdir, callbacks, **kw)

        fresh3_cases._fit = probe_fit
        try:
            base = run_eval.train_case(c, tempfile.mkdtemp(prefix="fresh3_mech_"))
        finally:
            fresh3_cases._fit = saved
        line = "%-28s %-24s as built bad=%s" % (name, c.cause, base["counter_first_bad"])
        if "norms" in profile:
            n, r = profile["norms"], profile["rms"]
            line += (
                " | grad norm first/last hidden %.3g/%.3g = %.3gx, hidden RMS first %.3g last %.3g"
                % (
                    n[0],
                    n[-1],
                    n[0] / n[-1],
                    r[0],
                    r[-1],
                )
            )
        for factor in (0.1, 0.01):

            def lower_fit(model, x, y=None, logdir=None, callbacks=(), factor=factor, **kw):
                import keras

                lr = model.optimizer._learning_rate
                if isinstance(lr, keras.optimizers.schedules.PolynomialDecay):
                    model.optimizer._learning_rate = keras.optimizers.schedules.PolynomialDecay(
                        lr.initial_learning_rate * factor,
                        lr.decay_steps,
                        lr.end_learning_rate * factor,
                    )
                else:
                    model.optimizer.learning_rate = float(model.optimizer.learning_rate) * factor
                return saved(model, x, y, logdir, callbacks, **kw)

            fresh3_cases._fit = lower_fit
            try:
                r = run_eval.train_case(c, tempfile.mkdtemp(prefix="fresh3_mech_"))
            finally:
                fresh3_cases._fit = saved
            line += " | lr x%g: bad=%s" % (factor, r["counter_first_bad"])
            if r["train_error"]:
                line += " (" + r["train_error"] + ")"
        print(line, flush=True)


if __name__ == "__main__":
    main()
    slot_gradients()
