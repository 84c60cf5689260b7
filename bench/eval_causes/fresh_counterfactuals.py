"""Counterfactual and mechanism checks for some fresh_cases.py blow-ups (independent of tb_nanwatch's
diagnosis; only the batch counter of run_eval.py and plain Keras are used).

    .venv/bin/python bench/eval_causes/fresh_counterfactuals.py

Counterfactual: the same case with the one thing its cause names undone (a 10x lower learning rate,
epsilon > 0, standardised targets or inputs, the Glorot/He initialisation, float32 instead of
float16, ...) must stay finite per the counter.  Mechanism: where the case's model is Sequential or
functional, the layer outputs on the first 64 training samples are computed after each step until
one is non-finite, to show which layer produced it and how large its input was; for the
optimizer_zero_division cases, every non-finite variable at the counter's first bad step is
listed (the optimizer's slots must not be among them).
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cases  # noqa: E402
import fresh_cases  # noqa: E402
import run_eval  # noqa: E402

_real_fit = cases._fit
_hook = {}


def _patched_fit(model, x, y=None, logdir=None, callbacks=(), **kw):
    mod = _hook.get("mod")
    extra = []
    if mod:
        x, y, kw, extra = mod(model, x, y, kw)
    return _real_fit(model, x, y, logdir, list(callbacks) + list(extra), **kw)


class _NoPolicy:
    def __init__(self, name):
        pass

    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


def run(name, mod=None, float32=False):
    c = next(c for c in fresh_cases.CASES if c.name == name)
    _hook["mod"] = mod
    saved_fit, saved_policy = fresh_cases._fit, fresh_cases._policy
    fresh_cases._fit = _patched_fit
    if float32:
        fresh_cases._policy = _NoPolicy
    try:
        return run_eval.train_case(c, tempfile.mkdtemp(prefix="fresh_cf_"))
    finally:
        fresh_cases._fit, fresh_cases._policy = saved_fit, saved_policy
        _hook.clear()


# ------------------------------------------------------------------------------ the modifications


def _np():
    import numpy as np

    return np


def lr_times(factor):
    def mod(model, x, y, kw):
        import keras

        opt = model.optimizer
        lr = opt._learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):

            class Scaled(keras.optimizers.schedules.LearningRateSchedule):
                def __call__(self, step):
                    return lr(step) * factor

            opt._learning_rate = Scaled()
        else:
            opt.learning_rate = float(opt.learning_rate.numpy()) * factor
        return x, y, kw, []

    return mod


def epsilon(value):
    def mod(model, x, y, kw):
        model.optimizer.epsilon = value
        return x, y, kw, []

    return mod


def standardise_targets(model, x, y, kw):
    return x, ((y - y.mean()) / y.std()).astype("float32"), kw, []


def standardise_inputs(model, x, y, kw):
    np = _np()
    axes = tuple(range(x.ndim - 1))
    if x.ndim == 3:  # a signal: one scale for the whole sequence
        return (x / np.abs(x).max()).astype("float32"), y, kw, []
    return ((x - x.mean(axes)) / x.std(axes)).astype("float32"), y, kw, []


def finite_data(model, x, y, kw):
    np = _np()
    x = np.nan_to_num(x) if isinstance(x, np.ndarray) else x
    y = np.nan_to_num(y, posinf=0.0) if isinstance(y, np.ndarray) else y
    return x, y, kw, []


def reinit_kernels(scale, which="kernel"):
    """Kernels drawn again with stddev scale / sqrt(fan_in) (1: LeCun/Glorot-like, sqrt(2): He)."""

    def mod(model, x, y, kw):
        np = _np()
        rng = np.random.default_rng(0)
        for layer in model.layers:
            cell = getattr(layer, "cell", layer)
            k = getattr(cell, which, None)
            if k is None:
                continue
            if which == "recurrent_kernel":
                k.assign((np.eye(k.shape[0]) * scale).astype("float32"))
            else:
                fan_in = int(np.prod(k.shape[:-1]))
                w = rng.standard_normal(k.shape) * scale / np.sqrt(fan_in)
                k.assign(w.astype("float32"))
        return x, y, kw, []

    return mod


def cap_sample_weight(cap):
    def mod(model, x, y, kw):
        np = _np()
        kw = dict(kw, sample_weight=np.minimum(kw["sample_weight"], cap).astype("float32"))
        return x, y, kw, []

    return mod


def tanh_cells(model, x, y, kw):
    import keras

    for layer in model.layers:
        if hasattr(layer, "cell"):
            layer.cell.activation = keras.activations.tanh
    return x, y, kw, []


def unset_scale(model, x, y, kw):
    model.scale = 1.0
    return x, y, kw, []


# ---------------------------------------------------------------------------------- the mechanism


def layer_trace(out):
    """After each step (and once before the first), the layer outputs on the first 64 samples
    until one is non-finite: `out` gets (step, layer, its input's largest |x|, its output's)."""

    def mod(model, x, y, kw):
        import keras

        np = _np()
        sample = [a[:64] for a in x] if isinstance(x, (list, tuple)) else x[:64]
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        probe = keras.Model(model.inputs, [layer.output for layer in layers])

        def look(step):
            if out:
                return
            values = probe(sample, training=False)
            prev = max(
                float(np.abs(np.asarray(a, "float64")).max())
                for a in (sample if isinstance(sample, list) else [sample])
            )
            for layer, v in zip(layers, values):
                dtype = str(getattr(v, "dtype", "?"))
                v = np.asarray(v, "float64")
                if not np.isfinite(v).all():
                    out.append((step, layer.name, prev, "non-finite %s" % dtype))
                    return
                prev = float(np.abs(v).max())

        class Look(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                look("before step 0")

            def on_train_batch_end(self, batch, logs=None):
                look("after step %d" % batch)

        return x, y, kw, [Look()]

    return mod


def nonfinite_variables(out):
    def mod(model, x, y, kw):
        import keras

        np = _np()

        class List(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if out:
                    return
                bad = [
                    v.path
                    for v in list(self.model.weights) + list(self.model.optimizer.variables)
                    if not np.isfinite(np.asarray(v.numpy(), "float64")).all()
                ]
                if bad:
                    out.append((batch, bad))

        return x, y, kw, [List()]

    return mod


COUNTERFACTUALS = [
    ("lr_two_input_sgd", "learning rate / 10", dict(mod=lr_times(0.1))),
    ("lr_warmup_typo", "schedule / 10", dict(mod=lr_times(0.1))),
    ("zero_div_adam_unused_rows", "epsilon=1e-7", dict(mod=epsilon(1e-7))),
    ("zero_div_rmsprop_absent_category", "epsilon=1e-7", dict(mod=epsilon(1e-7))),
    ("targets_energy_wh", "standardised targets", dict(mod=standardise_targets)),
    ("targets_revenue_cents", "standardised targets", dict(mod=standardise_targets)),
    ("inputs_raw_pcm", "audio scaled to [-1, 1]", dict(mod=standardise_inputs)),
    ("inputs_flow_bytes", "standardised features", dict(mod=standardise_inputs)),
    ("init_ones_kernels", "He-scaled kernels", dict(mod=reinit_kernels(2**0.5))),
    ("init_conv1d_stddev", "He-scaled kernels", dict(mod=reinit_kernels(2**0.5))),
    (
        "grad_deep_tanh_chaotic",
        "Glorot-scale kernels (1/sqrt(fan_in))",
        dict(mod=reinit_kernels(1)),
    ),
    (
        "grad_deep_tanh_functional",
        "Glorot-scale kernels (1/sqrt(fan_in))",
        dict(mod=reinit_kernels(1)),
    ),
    (
        "recurrent_identity_gain",
        "identity recurrent kernel, gain 1",
        dict(mod=reinit_kernels(1.0, "recurrent_kernel")),
    ),
    ("recurrent_irnn_rainfall", "tanh instead of ReLU", dict(mod=tanh_cells)),
    ("fp16_softplus_beta", "float32 policy", dict(float32=True)),
    ("fp16_lse_pooling", "float32 policy", dict(float32=True)),
    (
        "slot_nadam_inverse_variance",
        "sample weights capped at 1e4",
        dict(mod=cap_sample_weight(1e4)),
    ),
    ("slot_manual_loss_scale", "loss scale 1", dict(mod=unset_scale)),
    ("target_growth_ratio", "the Inf target set to 0", dict(mod=finite_data)),
    ("target_soft_label_votes", "the NaN labels set to 0", dict(mod=finite_data)),
    ("input_blank_frame", "the NaN frame set to 0", dict(mod=finite_data)),
]

MECHANISM = [
    "recurrent_irnn_rainfall",
    "recurrent_identity_gain",
    "fp16_softplus_beta",
    "fp16_lse_pooling",
    "domain_gem_pooling",
    "domain_layernorm_no_eps",
    "loss_gaussian_nll_relu_var",
    "loss_cosine_relu",
    "init_ones_kernels",
]


def main(argv=None):
    only = set(argv[0].split(",")) if argv else None
    for name, change, kw in COUNTERFACTUALS:
        if only and name not in only:
            continue
        r = run(name, **kw)
        print(
            "counterfactual %-32s %-38s counter_first_bad=%s %s loss %s -> %s%s"
            % (
                name,
                change,
                r["counter_first_bad"],
                r["counter_what"] or "",
                r["first_loss"],
                r["last_loss"],
                " ERROR " + r["train_error"] if r["train_error"] else "",
            ),
            flush=True,
        )
    for name in MECHANISM:
        if only and name not in only:
            continue
        out = []
        r = run(name, mod=layer_trace(out))
        print(
            "mechanism      %-32s first non-finite layer output: %s (counter %s %s)%s"
            % (
                name,
                out[0] if out else "none",
                r["counter_first_bad"],
                r["counter_what"],
                " ERROR " + r["train_error"] if r["train_error"] else "",
            ),
            flush=True,
        )
    for name in ("zero_div_adam_unused_rows", "zero_div_rmsprop_absent_category"):
        if only and name not in only:
            continue
        out = []
        r = run(name, mod=nonfinite_variables(out))
        print(
            "mechanism      %-32s non-finite variables at the first bad step: %s" % (name, out),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
