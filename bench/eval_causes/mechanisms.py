"""Mechanism checks for the fresh2_cases.py or fresh3_cases.py cases that name exploding
gradients or a learning rate too high, independent of tb_nanwatch's diagnosis (plain Keras and
run_eval's batch counter):

- the gradient norm w.r.t. each hidden layer's output at the initial weights, on the first batch:
  the ratio first / last hidden layer (growth layer over layer backward), and the RMS of the
  first and last hidden outputs;
- the same training with the learning rate divided by 10 and by 100: an exploding gradient still
  blows up at a sane (lower) rate; a learning rate that is too high does not;
- fresh3 only, for its optimizer_state_overflow cases: the loss and the largest |gradient| on the
  first batch at the initial weights: finite, and above sqrt(float32 max) = 1.8e19, so g^2
  overflows in the slot while the gradient it is built from is finite.

    .venv/bin/python bench/eval_causes/mechanisms.py --suite fresh2|fresh3
"""

import argparse
import importlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_eval  # noqa: E402

# Per suite: the cases to check, the layer types whose outputs count as hidden layers, and the
# optimizer_state_overflow cases whose first-batch gradients to measure.
SUITES = {
    "fresh2": (
        [
            "grad_residual_mlp_no_norm",
            "grad_residual_conv1d",
            "lr_wide_deep_sgd",
            "lr_piecewise_autoencoder",
        ],
        ("Add", "Dense", "Conv1D"),
        [],
    ),
    "fresh3": (
        [
            "grad_transformer_without_layernorm",
            "grad_residual_separable_no_bn",
            "lr_depthwise_polynomial",
            "lr_momentum_steps_per_execution",
        ],
        ("Add", "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D"),
        ["slot_amsgrad_fixed_sigma", "slot_rmsprop_inverse_target_variance"],
    ),
}


def gradient_profile(model, x, y, hidden_types):
    import keras
    import numpy as np
    import tensorflow as tf

    types = tuple(getattr(keras.layers, t) for t in hidden_types)
    hidden = [layer for layer in model.layers if isinstance(layer, types)][:-1]
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


def lower_learning_rate(optimizer, factor):
    """The optimizer's rate times `factor`, its schedule's too (the suites use these two)."""
    import keras

    schedules = keras.optimizers.schedules
    lr = optimizer._learning_rate
    if isinstance(lr, schedules.PiecewiseConstantDecay):
        optimizer._learning_rate = schedules.PiecewiseConstantDecay(
            lr.boundaries, [v * factor for v in lr.values]
        )
    elif isinstance(lr, schedules.PolynomialDecay):
        optimizer._learning_rate = schedules.PolynomialDecay(
            lr.initial_learning_rate * factor, lr.decay_steps, lr.end_learning_rate * factor
        )
    else:
        optimizer.learning_rate = float(optimizer.learning_rate) * factor


def with_fit(suite, fit, run):
    """`run()` with the suite's `_fit` replaced by `fit(saved_fit, ...)`, restored after."""
    saved = suite._fit
    suite._fit = lambda *args, **kw: fit(saved, *args, **kw)
    try:
        return run()
    finally:
        suite._fit = saved


def check_rates(suite, names, hidden_types):
    for name in names:
        c = next(c for c in suite.CASES if c.name == name)
        profile = {}

        def probe_fit(saved, model, x, y=None, logdir=None, callbacks=(), **kw):
            if not hasattr(x, "element_spec"):
                profile["norms"], profile["rms"] = gradient_profile(model, x, y, hidden_types)
            return saved(model, x, y, logdir, callbacks, **kw)

        base = with_fit(suite, probe_fit, lambda: run_eval.train_case(c, tempfile.mkdtemp()))
        line = "%-28s %-24s as built bad=%s" % (name, c.cause, base["counter_first_bad"])
        if "norms" in profile:
            n, r = profile["norms"], profile["rms"]
            line += (
                " | grad norm first/last hidden %.3g/%.3g = %.3gx, hidden RMS first %.3g last %.3g"
                % (n[0], n[-1], n[0] / n[-1], r[0], r[-1])
            )
        for factor in (0.1, 0.01):

            def lower_fit(saved, model, x, y=None, logdir=None, callbacks=(), factor=factor, **kw):
                lower_learning_rate(model.optimizer, factor)
                return saved(model, x, y, logdir, callbacks, **kw)

            r = with_fit(suite, lower_fit, lambda: run_eval.train_case(c, tempfile.mkdtemp()))
            line += " | lr x%g: bad=%s" % (factor, r["counter_first_bad"])
            if r["train_error"]:
                line += " (" + r["train_error"] + ")"
        print(line, flush=True)


def check_slot_gradients(suite, names):
    import keras
    import tensorflow as tf

    for name in names:
        c = next(c for c in suite.CASES if c.name == name)
        got = {}

        def probe(saved, model, x, y=None, logdir=None, callbacks=(), **kw):
            first = lambda a: [v[:32] for v in a] if isinstance(a, (list, tuple)) else a[:32]  # noqa: E731
            xb, yb = first(x), first(y)
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            got["loss"] = float(loss)
            got["gmax"] = max(float(tf.reduce_max(tf.abs(g))) for g in grads)

        keras.utils.set_random_seed(1234)
        with_fit(suite, probe, lambda: c.fn(None, []))
        print(
            "%-38s loss %.3g, largest |gradient| %.3g: finite %s, g^2 above float32's max %s"
            % (name, got["loss"], got["gmax"], got["gmax"] < float("inf"), got["gmax"] > 1.8e19),
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    args = ap.parse_args(argv)
    suite = importlib.import_module(args.suite + "_cases")
    names, hidden_types, slot_names = SUITES[args.suite]
    check_rates(suite, names, hidden_types)
    check_slot_gradients(suite, slot_names)


if __name__ == "__main__":
    main()
