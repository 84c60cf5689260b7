"""Real building blocks for the writer's test matrix (tests/test_models.py), and the ground
truths they are checked against, established without the writer.

A case is a small compiled model and its data.  `run_case` trains it twice with the same
seed and data under op determinism: once plainly, once with `NanWatchCallback`.  In both
runs a `Probe` callback, at the start of step `inject_step`,
  1. snapshots every model and optimizer variable (training so far, to compare bitwise),
  2. writes a NaN into one element of the target layer's first weight,
  3. (plain run only) runs the step's batch through the model's layers eagerly and notes
     the first layer whose output holds a NaN or Inf: the ground truth for the layer;
     the step is the Probe's own batch count.
"""

import os

import keras
import numpy as np
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch import reader

BATCH = 8


def variable_values(model, optimizers):
    """[(name, array)] of every model variable, then every optimizer variable, in a fixed order."""
    out = [("model/" + v.path, np.array(v.numpy())) for v in model.variables]
    for i, optimizer in enumerate(optimizers):
        out += [("optimizer%d/%s" % (i, v.path), np.array(v.numpy())) for v in optimizer.variables]
    return out


def compare_bitwise(plain, watched):
    """Names of the variables that differ (bit for bit), each with its max abs difference."""
    # Auto-generated names differ between two builds (sequential, sequential_1): compare in order.
    assert [a.shape for _, a in plain] == [b.shape for _, b in watched], (
        "the runs have different variables"
    )
    differ = []
    for (name, a), (_, b) in zip(plain, watched):
        if a.shape != b.shape or a.tobytes() != b.tobytes():
            diff = (
                np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
                if a.shape == b.shape
                else None
            )
            differ.append((name, diff))
    return differ


def first_nonfinite_output(layers, call):
    """The name of the first of `layers` whose output (by `call(outputs)`) holds a NaN/Inf."""
    outputs = call()
    for layer, value in zip(layers, outputs):
        if any(
            not np.all(np.isfinite(np.asarray(t)))
            for t in tf.nest.flatten(value)
            if np.asarray(t).dtype.kind == "f"
        ):
            return layer.name
    return None


def layer_outputs_truth(model, prefix="", upto=None):
    """Ground truth by a feature extractor: every single-node layer's output for the batch, in
    the functional graph's (topological) order; the first non-finite one."""
    layers = [
        l
        for l in model.layers
        if not isinstance(l, keras.layers.InputLayer) and len(l._inbound_nodes) == 1
    ]
    if upto is not None:
        # Only layers before `upto` in the graph's order can come first: no need to compute the rest.
        names = [l.name for l in layers]
        layers = layers[: names.index(upto) + 1] if upto in names else layers
    extractor = keras.Model(model.inputs, [l.output for l in layers])

    def truth(x):
        name = first_nonfinite_output(layers, lambda: extractor(x, training=False))
        return prefix + name if name else None

    return truth


class Probe(keras.callbacks.Callback):
    """Snapshot, NaN injection and ground truth at the start of step `inject_step`."""

    def __init__(self, case, ground_truth=True):
        super().__init__()
        self.case = case
        self.ground_truth = ground_truth
        self.started = 0
        self.snapshot = None
        self.truth = None  # (step, layer path) of the first non-finite layer output

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution, Keras calls back once per execution with its last step.
        self.started = batch + 1

    def on_train_batch_begin(self, batch, logs=None):
        step = batch  # one epoch: Keras's own step count (the execution's first step)
        if step != self.case.inject_step:
            return
        self.snapshot = variable_values(self.model, self.case.optimizers(self.model))
        if self.case.target is None:
            return
        variable = self.case.target_variable(self.model)
        value = variable.numpy()
        value.reshape(-1)[0] = np.nan
        variable.assign(value)
        if self.ground_truth:
            batch_x = tf.nest.map_structure(
                lambda a: a[step * self.case.batch : (step + 1) * self.case.batch], self.case.x
            )
            self.truth = (step, self.case.truth(self.model)(batch_x))


class Case:
    """A model of the matrix.  `build()` returns the compiled model (seeded by the caller);
    `target`: path of the layer whose first weight gets the NaN ('encoder/dense' for a layer
    of a nested model); `truth(model)`: a function of the step's batch giving the path of the
    first non-finite layer output (default: a feature extractor over the model's layers)."""

    def __init__(
        self,
        name,
        build,
        x,
        y,
        target=None,
        steps=4,
        inject_step=3,
        batch=BATCH,
        truth=None,
        optimizers=None,
        fit_kwargs=None,
        expected_kind="activation",
    ):
        self.name = name
        self.build = build
        self.x, self.y = x, y
        self.target = target
        self.steps = steps
        self.inject_step = inject_step
        self.batch = batch
        self._truth = truth
        self._optimizers = optimizers
        self.fit_kwargs = dict(fit_kwargs or {})
        self.expected_kind = expected_kind
        self.cell_in_loop = False  # an RNN layer whose cell runs in a while_loop (unroll=False)

    def __repr__(self):
        return self.name

    def optimizers(self, model):
        return self._optimizers(model) if self._optimizers else [model.optimizer]

    def target_layer(self, model):
        layer = model
        for name in self.target.split("/"):
            layer = layer.get_layer(name) if hasattr(layer, "get_layer") else getattr(layer, name)
        return layer

    def target_variable(self, model):
        return self.target_layer(model).trainable_weights[0]

    def truth(self, model):
        if self._truth is not None:
            return self._truth(model)
        return layer_outputs_truth(model, upto=self.target.split("/")[0])


class Result:
    def __init__(self, case, plain, watched, plain_model, watched_model, callback, logdir):
        self.case = case
        self.plain, self.watched = plain, watched  # Probe callbacks of the two runs
        self.plain_model, self.watched_model = plain_model, watched_model
        self.callback = callback
        self.logdir = logdir

    @property
    def sites(self):
        return self.callback.watch.sites

    def first_nonfinite(self):
        provider, ctx, eid = reader.open_logdir(os.path.dirname(self.logdir))
        run = reader.read_run(provider, ctx, eid, os.path.basename(self.logdir))
        return reader.first_nonfinite_json(run)


def _fit(case, callbacks):
    keras.utils.set_random_seed(0)
    model = case.build()
    model.fit(
        case.x,
        case.y,
        batch_size=case.batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **case.fit_kwargs,
    )
    return model


def run_case(case, logdir):
    """The plain run, then the watched run (a Result); op determinism on for both."""
    tf.config.experimental.enable_op_determinism()
    plain = Probe(case)
    plain_model = _fit(case, [plain])
    watched = Probe(case, ground_truth=False)
    callback = tb_nanwatch.NanWatchCallback(str(logdir), log_every=2)
    watched_model = _fit(case, [callback, watched])
    return Result(case, plain, watched, plain_model, watched_model, callback, str(logdir))
