"""Replay: run a repro bundle's step again, eagerly, and name the op that goes non-finite.

    result = tb_nanwatch.replay("logs/run1")            # the bundle's serialised model
    result = tb_nanwatch.replay("logs/run1", model=m)   # or your own (custom layers, subclasses)
    result.as_json()  # step, reproduced, verdict, site, op {type, name, source}, input, remedies

The bundle's state (weights and optimizer variables from before the step) is restored into
the model, and the step runs once more eagerly, like Keras's `train_step`: forward, loss,
gradients, the optimizer's update.  Pass 1 checks every site in the Watch's execution order
(input, each layer's output, loss, the gradient at each layer's output and its weights', each
optimizer slot and weight) and finds the first non-finite one.  Pass 2 restores the state again
and reruns the step under `tf.debugging.enable_check_numerics()`, which stops at the first op
whose output is not finite: its type, name and the user's source line.

Verdict: "reproducible" when the replay's first site is the recorded one; "not_reproducible"
when the replay stays finite (a transient fault: hardware, a race, state outside the model);
"xla_only" when the run was compiled with XLA, eager stays finite, and the same step compiled
again does go non-finite.  A replay that goes non-finite at another site is not "reproduced".

Remedies: for each cause the run's diagnosis names, its remedy is tried on the same state and
batch where it can be applied mechanically (`MECHANICAL`), each trial from the restored state
and undone after; see `try_remedies`.
"""

import json
import logging
import re

import numpy as np

from tb_nanwatch import bundle as bundle_module
from tb_nanwatch import stats

logger = logging.getLogger("tb_nanwatch.replay")


class ReplayError(Exception):
    """The bundle cannot be replayed (no model, a model that does not match the bundle)."""


class ReplayResult:
    def __init__(self, step, verdict, reproduced, site, op, input_location, recorded, notes):
        self.step = step
        self.verdict = verdict
        self.reproduced = reproduced
        self.site = site
        self.op = op
        self.input = input_location
        self.recorded = recorded
        self.remedies = []  # [{cause, remedy, applied, finite_after[, why]}]
        self.notes = notes

    def as_json(self):
        return {
            "step": self.step,
            "reproduced": self.reproduced,
            "verdict": self.verdict,
            "site": self.site,
            "op": self.op,
            "input": self.input,
            "recorded": self.recorded,
            "remedies": list(self.remedies),
            "notes": list(self.notes),
        }

    def __repr__(self):
        return "ReplayResult(%s)" % json.dumps(self.as_json())


def _unflatten(batch, prefix):
    """The structure named `prefix`, `prefix/0`, `prefix/key` ... rebuilt from the flat batch."""
    if prefix in batch:
        return batch[prefix]
    children = {}
    for name, value in batch.items():
        if name.startswith(prefix + "/"):
            head, _, rest = name[len(prefix) + 1 :].partition("/")
            children.setdefault(head, []).append(rest)
    if not children:
        return None
    if all(k.isdigit() for k in children):
        return tuple(_unflatten(batch, "%s/%s" % (prefix, k)) for k in sorted(children, key=int))
    return {k: _unflatten(batch, "%s/%s" % (prefix, k)) for k in children}


def _nonfinite(value):
    import tensorflow as tf

    if value is None:
        return False
    if isinstance(value, tf.IndexedSlices):
        value = value.values
    value = tf.convert_to_tensor(value)
    if not value.dtype.is_floating:
        return False
    return not bool(tf.reduce_all(tf.math.is_finite(value)))


def _input_location(batch):
    """Where the batch is not finite: per input, the rows and the first element indices."""
    out = []
    for name, array in batch.items():
        array = np.asarray(array)
        if array.dtype.kind != "f":
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            where = np.argwhere(bad)
            out.append(
                {
                    "name": name,
                    "rows": sorted({int(i) for i in where[:, 0]}) if array.ndim else [],
                    "elements": [[int(i) for i in w] for w in where[:8]],
                    "count": int(bad.sum()),
                }
            )
    return out


def _restore(model, optimizer, loaded):
    weights = list(loaded.weights.values())
    variables = list(model.variables)
    if len(weights) != len(variables):
        raise ReplayError(
            "the model has %d variables, the bundle %d: pass the model the run trained"
            % (len(variables), len(weights))
        )
    for variable, value in zip(variables, weights):
        if tuple(variable.shape) != tuple(value.shape):
            raise ReplayError(
                "variable %s has shape %s, the bundle's %s"
                % (variable.path, tuple(variable.shape), value.shape)
            )
        variable.assign(value.astype(variable.dtype))
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    slots = list(loaded.optimizer_variables.values())
    opt_variables = list(optimizer.variables)
    if len(slots) != len(opt_variables):
        raise ReplayError(
            "the optimizer has %d variables, the bundle %d" % (len(opt_variables), len(slots))
        )
    for variable, value in zip(opt_variables, slots):
        variable.assign(np.asarray(value).astype(variable.dtype))


class _LayerHooks:
    """Wraps every layer's call (eager): each output, in completion order, and the layers
    running when an error is raised."""

    def __init__(self, model):
        from tb_nanwatch.watch import sites

        self.layers = sites.layer_paths(model)
        self.outputs = []  # (path, tensor)
        self.running = []
        self.failed_in = None
        self._saved = []

    def __enter__(self):
        import functools

        for path, layer in self.layers:
            original = layer.call
            had_own = "call" in vars(layer)

            def call(*args, _original=original, _path=path, **kwargs):
                self.running.append(_path)
                try:
                    out = _original(*args, **kwargs)
                except Exception:
                    if self.failed_in is None:
                        self.failed_in = list(self.running)
                    raise
                finally:
                    self.running.pop()
                for t in _float_tensors(out):
                    self.outputs.append((_path, t))
                return out

            functools.update_wrapper(call, original)
            object.__setattr__(layer, "call", call)
            self._saved.append((layer, had_own, original))
        return self

    def __exit__(self, *exc):
        for layer, had_own, original in reversed(self._saved):
            if had_own:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


def _float_tensors(structure):
    import tensorflow as tf

    return [
        t for t in tf.nest.flatten(structure) if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]


def _step(model, optimizer, x, y, sample_weight, hooks, check):
    """One training step, eagerly, as Keras's train_step; `check(site)` is called on each site
    in the Watch's execution order and returns True to stop there."""
    import tensorflow as tf

    name = model.name
    x, y, sample_weight = (
        None if part is None else tf.nest.map_structure(tf.convert_to_tensor, part)
        for part in (x, y, sample_weight)
    )
    if any(_nonfinite(t) for t in _float_tensors(x)) and check((name, "input", "")):
        return
    # What the loss consumes besides the model's output, named as the Watch names its sites.
    from tb_nanwatch.watch import instrument
    from tb_nanwatch.watch import sites as site_catalogue

    outputs = instrument.output_names(model)
    for kind, part in (("target", y), ("sample_weight", sample_weight)):
        for tensor_name, t in (
            site_catalogue.named_float_tensors(part, outputs) if part is not None else []
        ):
            if _nonfinite(t) and check((name, kind, tensor_name)):
                return
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        try:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        except ValueError as e:
            if "No loss to compute" not in str(e):
                raise
            raise ReplayError(
                "the model has no compiled loss (its train_step computes one of its own): the "
                "replay runs Keras' own step, compile(loss=...) to replay it"
            ) from e
        loss = optimizer.scale_loss(loss)
    seen = []
    for path, t in hooks.outputs:
        if path not in seen:
            seen.append(path)
    for path in seen:
        if any(_nonfinite(t) for p, t in hooks.outputs if p == path) and check(
            (path, "activation", "")
        ):
            return
    if _nonfinite(loss) and check((name, "loss", "")):
        return
    weights = list(model.trainable_variables)
    outputs = [t for _, t in hooks.outputs]
    grads = tape.gradient(loss, outputs + weights)
    out_grads, weight_grads = grads[: len(outputs)], grads[len(outputs) :]
    owner = {}
    for path, layer in hooks.layers:
        for v in getattr(layer, "_trainable_variables", []):
            owner.setdefault(id(v), path)
    placed = set()
    for path in reversed(seen):
        if any(_nonfinite(g) for (p, _), g in zip(hooks.outputs, out_grads) if p == path) and check(
            (path, "activation_grad", "")
        ):
            return
        for v, g in zip(weights, weight_grads):
            if owner.get(id(v)) == path and id(v) not in placed:
                placed.add(id(v))
                if _nonfinite(g) and check((path, "weight_grad", v.name)):
                    return
    for v, g in zip(weights, weight_grads):
        if (
            id(v) not in placed
            and _nonfinite(g)
            and check((owner.get(id(v), name), "weight_grad", v.name))
        ):
            return
    optimizer.apply(weight_grads, weights)
    from tb_nanwatch.watch import flavour as flavours

    per_variable = flavours.of_optimizer(optimizer).variable_slots(optimizer, weights)
    for v, slots in zip(weights, per_variable):
        path = owner.get(id(v), name)
        for slot_name, slot in slots:
            if (
                slot is not None
                and _nonfinite(slot)
                and check((path, "optimizer_state", "%s/%s" % (slot_name, v.name)))
            ):
                return
        if _nonfinite(v) and check((path, "weight", v.name)):
            return


_OP_TYPE = re.compile(r'eagerly-executing op "([^"]+)"|op "([^"]+)"|Op:(\w+)')


def _first_op(model, optimizer, loaded, x, y, sample_weight):
    """Pass 2: the first op whose output is not finite, with the user's source line."""
    import tensorflow as tf

    from tb_nanwatch.watch import sources

    _restore(model, optimizer, loaded)
    hooks = _LayerHooks(model)
    tf.debugging.enable_check_numerics()
    try:
        with hooks:
            _step(model, optimizer, x, y, sample_weight, hooks, lambda site: False)
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as error:
        message = str(error)
        match = _OP_TYPE.search(message)
        op_type = next((g for g in match.groups() if g), None) if match else None
        name = re.search(r"op name: ([^\s]+)", message)
        import traceback

        frames = traceback.extract_tb(error.__traceback__)
        user = [f for f in frames if sources.is_user_frame(f.filename)]
        source = (
            {"file": user[-1].filename, "line": user[-1].lineno, "function": user[-1].name}
            if user
            else None
        )
        dtype = re.search(r"dtype: <dtype: '(\w+)'>", message)
        return {
            "type": op_type,
            "name": name.group(1) if name else None,
            "source": source,
            "layer": hooks.failed_in[-1] if hooks.failed_in else None,
            # The output's dtype and what it held: an overflow (+-Inf) in float16 is a
            # precision problem, a NaN out of finite inputs a domain error.
            "dtype": dtype.group(1) if dtype else None,
            "values": [w for w in ("NaN", "+Inf", "-Inf") if "# of %s elements" % w in message],
        }
    finally:
        tf.debugging.disable_check_numerics()
    return None


def _forward_op(run_dir, op_type):
    """For a gradient op with no user frame (`SqrtGrad`), the forward op it differentiates and
    where the user's code created it, from the run's nanwatch_ops.json; None if not found."""
    from tb_nanwatch import op_sources

    if not op_type or not op_type.endswith("Grad"):
        return None
    forward_type = op_type[: -len("Grad")]
    try:
        record = op_sources.read_op_sources(run_dir)
    except op_sources.OpSourcesError:
        return None
    for layer, entry in (record or {}).get("layers", {}).items():
        for op in entry["ops"]:
            if op["type"] == forward_type and op.get("source"):
                return {"type": forward_type, "layer": layer, "source": op["source"][-1]}
    return None


def _load_model(loaded, model, custom_objects):
    if model is not None:
        return model
    if not loaded.architecture:
        raise ReplayError(
            "the bundle at %s holds no architecture (the model did not serialise): pass model="
            % loaded.path
        )
    import keras

    model = keras.saving.deserialize_keras_object(
        json.loads(loaded.architecture), custom_objects=custom_objects, safe_mode=True
    )
    if getattr(model, "optimizer", None) is None:
        raise ReplayError(
            "the serialised model in %s has no optimizer (it was not compiled): pass model="
            % loaded.path
        )
    return model


def _xla_reproduces(model, optimizer, loaded, x, y, sample_weight):
    """The same step compiled with XLA: does any loss or variable go non-finite?"""
    import tensorflow as tf

    _restore(model, optimizer, loaded)

    @tf.function(jit_compile=True)
    def compiled_step():
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    loss = compiled_step()
    return _nonfinite(loss) or any(_nonfinite(v) for v in model.variables + optimizer.variables)


# -- Remedies tried on the same state and batch ------------------------------------------------
#
# Each trial restores the bundle's state, changes one thing, reruns the step (pass 1's checks)
# and undoes the change: the model and optimizer end as the bundle had them.  A trial is
# (words, apply) where apply(ctx) returns an undo function, or a string: why it cannot apply.


def _optimizer_of(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own


def _clipping(ctx, global_clipnorm=None, clipvalue=None):
    """The optimizer's clipping set to these (the others off); the undo puts all three back."""
    opt = _optimizer_of(ctx["optimizer"])
    saved = (opt.clipnorm, opt.global_clipnorm, opt.clipvalue)
    opt.clipnorm, opt.global_clipnorm, opt.clipvalue = None, global_clipnorm, clipvalue

    def undo():
        opt.clipnorm, opt.global_clipnorm, opt.clipvalue = saved

    return undo


def _clip_gradients(ctx):
    return _clipping(ctx, global_clipnorm=1.0)


def _lower_learning_rate(ctx):
    from keras.optimizers import schedules

    opt = _optimizer_of(ctx["optimizer"])
    if isinstance(opt._learning_rate, schedules.LearningRateSchedule) or callable(
        opt._learning_rate
    ):
        return "the learning rate is a schedule: lower its initial value in your code"
    old = float(np.asarray(opt.learning_rate))
    opt.learning_rate = old / 10.0

    def undo():
        opt.learning_rate = old

    return undo


def _layer_in_float32(ctx):
    layer = ctx["layer"]
    if layer is None:
        return "no layer produced the first non-finite value"
    policy = layer.dtype_policy
    if policy.compute_dtype not in ("float16", "bfloat16"):
        return "%s already computes in %s" % (ctx["layer_path"], policy.compute_dtype)
    layer.dtype_policy = "float32"

    def undo():
        layer.dtype_policy = policy

    return undo


def _model_in_float32(ctx):
    """Every half-precision layer computes in float32: whether half precision is the fault at
    all, when the producer's layer alone is not enough (its gradient comes from the layers
    after it, a later layer overflows on its output)."""
    changed = []
    for layer in ctx["model"]._flatten_layers(include_self=False):
        policy = layer.dtype_policy
        if policy.compute_dtype in ("float16", "bfloat16"):
            changed.append((layer, policy))
            layer.dtype_policy = "float32"
    if not changed:
        return "no layer computes in float16 or bfloat16"

    def undo():
        for layer, policy in changed:
            layer.dtype_policy = policy

    return undo


def _clip_values(ctx):
    """Each gradient element to [-1, 1]: no square is computed, where a global norm of gradients
    beyond 1e19 overflows float32 itself."""
    return _clipping(ctx, clipvalue=1.0)


def _standardise_inputs(ctx):
    """Per-feature mean and std of the bundle's batch (the batch is all the replay has)."""
    if ctx["step"]:
        # The weights were fit to the raw scale by the steps before: this batch alone tests nothing.
        return (
            "the weights before step %d were trained on the unscaled inputs: standardise them "
            "from the start of training" % ctx["step"]
        )
    x = ctx["x"]
    import tensorflow as tf

    def standardise(a):
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.ndim < 2:
            return a
        std = a.std(axis=0)
        return ((a - a.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(a.dtype)

    saved = ctx["x"]
    ctx["x"] = tf.nest.map_structure(standardise, x)

    def undo():
        ctx["x"] = saved

    return undo


def _adam_epsilon(ctx):
    opt = _optimizer_of(ctx["optimizer"])
    if not hasattr(opt, "epsilon"):
        return "%s has no epsilon" % type(opt).__name__
    old = opt.epsilon
    if old:
        return "epsilon is already %g" % old
    opt.epsilon = 1e-7

    def undo():
        opt.epsilon = old

    return undo


CLIP = ("clip the gradients (global_clipnorm=1.0)", _clip_gradients)
LOWER_LR = ("lower the learning rate 10x", _lower_learning_rate)
FLOAT32 = ("compute the layer in float32 (its variables keep their dtype)", _layer_in_float32)
FLOAT32_MODEL = ("compute every layer in float32 (variables keep their dtype)", _model_in_float32)
CLIP_VALUE = ("clip each gradient value to [-1, 1] (clipvalue=1.0)", _clip_values)
STANDARDISE = ("standardise the inputs", _standardise_inputs)
EPSILON = ("epsilon 1e-7 in the optimizer", _adam_epsilon)

# The remedies of causes.py that a replay can apply without the user's code; a cause that is
# not here (or whose list is empty) needs a change to the data, the model or its code.
MECHANICAL = {
    "unscaled_inputs": [STANDARDISE],
    "reduced_precision_overflow": [FLOAT32, FLOAT32_MODEL],
    "reduced_precision_underflow": [FLOAT32, EPSILON],
    "loss_scale_collapse": [FLOAT32, CLIP],
    "learning_rate_too_high": [LOWER_LR, CLIP],
    "exploding_gradients": [CLIP, LOWER_LR],
    "optimizer_state_overflow": [CLIP, CLIP_VALUE],
    "optimizer_zero_division": [EPSILON],
    "vanishing_gradients": [LOWER_LR],
}
# Tried when no named cause has a mechanical remedy, to say whether the usual guesses would help.
USUAL_GUESSES = [CLIP, LOWER_LR]
NOT_MECHANICAL = "its remedy is a change to the data, the model or the code (see the diagnosis)"


def _diagnosed_causes(run_dir, step, op):
    """The cause IDs the diagnosis names for the run, most likely first, with what this replay
    found of the op (not a previous replay's remedies); [] if unreadable."""
    import os

    from tb_nanwatch import diagnosis, runview

    try:
        view = runview.from_files(os.path.basename(os.path.normpath(str(run_dir))), run_dir)
        found = {"step": step, "op": op, "remedies": []}
        return [d["cause"] for d in diagnosis.diagnose(view, replay=found)]
    except Exception as e:  # a damaged or unreadable log: the replay stands without remedies
        logger.warning("no diagnosis for %s, no remedy tried: %s", run_dir, e)
        return []


def _try(model, optimizer, loaded, ctx, apply):
    """(applied, finite_after, why or the first non-finite site with it): restores the
    bundle's state, applies, reruns, undoes."""
    _restore(model, optimizer, loaded)
    outcome = apply(ctx)
    if isinstance(outcome, str):
        return False, None, outcome
    found = []
    try:
        with _LayerHooks(model) as hooks:
            _step(
                model,
                optimizer,
                ctx["x"],
                ctx["y"],
                ctx["sample_weight"],
                hooks,
                lambda site: found.append(site) or True,
            )
    except Exception as e:  # the change broke the step (a dtype mismatch ...): it did not hold
        return True, False, "the step failed with it: %s" % str(e).splitlines()[0][:200]
    finally:
        outcome()
    return True, not found, found[0] if found else None


# A remedy of the update (clipping, the learning rate, epsilon) cannot change a step that went
# non-finite in its forward pass (stats.PHASES).
UPDATE_REMEDIES = (_clip_gradients, _clip_values, _lower_learning_rate, _adam_epsilon)
FORWARD_FAILURE = (
    "the step went non-finite in its forward pass, before the update this changes: a replay of "
    "the step cannot tell whether it would have helped on the steps before"
)


def try_remedies(
    run_dir, model, optimizer, loaded, x, y, sample_weight, layer_path, op=None, kind=None
):
    """[{cause, remedy, applied, finite_after[, why][, nonfinite_at]}] for the causes the
    diagnosis names; finite_after is None for a remedy that was not applied.  `kind`: the
    kind of site the replay went non-finite at (a forward one leaves update remedies out)."""
    from tb_nanwatch.watch import sites

    layer = dict(sites.layer_paths(model)).get(layer_path)
    out = []

    def record(cause, words, apply):
        if stats.PHASES.get(kind) == "forward" and apply in UPDATE_REMEDIES:
            out.append(
                {
                    "cause": cause,
                    "remedy": words,
                    "applied": False,
                    "finite_after": None,
                    "why": FORWARD_FAILURE,
                }
            )
            return
        ctx = {
            "step": loaded.step,
            "model": model,
            "optimizer": optimizer,
            "layer": layer,
            "layer_path": layer_path,
            "x": x,
            "y": y,
            "sample_weight": sample_weight,
        }
        applied, finite_after, why = _try(model, optimizer, loaded, ctx, apply)
        entry = {"cause": cause, "remedy": words, "applied": applied, "finite_after": finite_after}
        if isinstance(why, tuple):  # where the step still went non-finite with it
            entry["nonfinite_at"] = dict(zip(("layer", "kind", "tensor"), why))
        elif why:
            entry["why"] = why
        out.append(entry)

    named = _diagnosed_causes(run_dir, loaded.step, op)
    for cause in named:
        trials = MECHANICAL.get(cause)
        if not trials:
            out.append(
                {
                    "cause": cause,
                    "remedy": None,
                    "applied": False,
                    "finite_after": None,
                    "why": NOT_MECHANICAL,
                }
            )
        for words, apply in trials or []:
            record(cause, words, apply)
    if named and not any(e["applied"] for e in out):
        for words, apply in USUAL_GUESSES:  # cause None: not a named cause's remedy
            record(None, words, apply)
    return out


def replay(run_dir, model=None, custom_objects=None):
    """Replays the repro bundle of `run_dir` (see the module's docstring); a `ReplayResult`."""
    loaded = bundle_module.load_bundle(run_dir)
    model = _load_model(loaded, model, custom_objects)
    optimizer = model.optimizer
    if optimizer is None:
        raise ReplayError("the model has no optimizer: compile it as the run did")
    notes = list(loaded.notes)
    if not loaded.batch:
        raise ReplayError("the bundle at %s holds no batch: %s" % (loaded.path, "; ".join(notes)))
    batch = {k: v for k, v in loaded.batch.items()}
    x, y, sample_weight = (
        _unflatten(batch, "x"),
        _unflatten(batch, "y"),
        _unflatten(batch, "sample_weight"),
    )
    recorded = loaded.first_nonfinite
    _restore(model, optimizer, loaded)
    found = []
    hooks = _LayerHooks(model)
    with hooks:
        _step(model, optimizer, x, y, sample_weight, hooks, lambda site: found.append(site) or True)
    site = None
    if found:
        layer, kind, tensor = found[0]
        site = {"layer": layer, "kind": kind, "tensor": tensor}
        outer = (recorded or {}).get("layer") or ""
        if outer and layer.startswith(outer + "/") and kind == recorded.get("kind"):
            # A layer run inside a nested graph (an RNN cell in its layer's loop) is watched
            # through the layer around it; eagerly its own calls are seen.
            site["layer"] = outer
    reproduced = bool(
        site
        and recorded
        and (site["layer"], site["kind"], site["tensor"] or "")
        == (recorded.get("layer"), recorded.get("kind"), recorded.get("tensor") or "")
    )
    op, input_location = None, None
    if site is not None and site["kind"] in ("input", "target", "sample_weight"):
        input_location = _input_location(batch)
    elif site is not None:
        op = _first_op(model, optimizer, loaded, x, y, sample_weight)
        if op is not None and op["source"] is None:
            op["forward"] = _forward_op(run_dir, op["type"])
    if reproduced:
        verdict = "reproducible"
    elif (
        site is None
        and loaded.jit_compile
        and _xla_reproduces(model, optimizer, loaded, x, y, sample_weight)
    ):
        verdict = "xla_only"
    else:
        verdict = "not_reproducible"
        if site is not None:
            notes.append(
                "the replay went non-finite at another site (%s, %s) than the run"
                % (site["layer"], site["kind"])
            )
    remedies = []
    if site is not None:  # a step that stays finite on replay has nothing to remedy
        remedies = try_remedies(
            run_dir, model, optimizer, loaded, x, y, sample_weight, site["layer"], op, site["kind"]
        )
    _restore(model, optimizer, loaded)  # leave the model as the bundle had it
    result = ReplayResult(
        loaded.step, verdict, reproduced, site, op, input_location, recorded, notes
    )
    result.remedies = remedies
    try:  # kept beside the run's records: the report and the tab say what the replay found
        from tb_nanwatch import failing_step

        failing_step.write_replay(run_dir, result.as_json())
    except OSError as e:
        result.notes.append("the result could not be kept in %s: %s" % (run_dir, e))
    return result
