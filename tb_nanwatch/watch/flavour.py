"""Keras 3 (`keras`) and Keras 2 (`tf_keras`, also `tf.keras` under TF_USE_LEGACY_KERAS=1):
everything the writer does differently for the two, in one place.

A flavour is chosen per object (the model, each optimizer) from the library its class comes
from, so nothing here imports either library.  What differs:

* sublayers and a layer's own weights (`_layers`/`_trainable_variables` in Keras 3,
  `_flatten_layers`/`_trainable_weights` in tf_keras) and a weight's short name (`kernel`,
  where tf_keras says `dense/kernel:0`);
* the optimizer method a step ends with (`apply(grads, variables)` in Keras 3,
  `apply_gradients(grads_and_vars)` in tf_keras; Keras 3's `apply_gradients` calls `apply`);
* where the optimizer keeps its slots and how a weight's index is found; tf_keras's legacy
  optimizers (`tf_keras.optimizers.legacy`) keep named slots (`get_slot`);
* loss scaling: a Keras 3 LossScaleOptimizer receives scaled gradients and holds its scale
  in `dynamic_scale`; tf_keras's receives gradients already unscaled (its
  `compute_gradients` or the user's `get_unscaled_gradients`) and reports `loss_scale`.
"""

import tensorflow as tf

from tb_nanwatch import stats


class UnsupportedError(TypeError):
    """Raised before anything is wrapped when a model or optimizer cannot be watched."""


def _library(obj):
    """'keras' (Keras 3), 'tf_keras' (Keras 2) or None, from the classes `obj` derives from."""
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module == "tf_keras" or module.startswith("tf_keras."):
            return "tf_keras"
        if module == "keras" or module.startswith("keras."):
            return "keras"
    return None


def _class_names(obj):
    return {cls.__name__ for cls in type(obj).__mro__}


def inner_optimizer(optimizer):
    """The optimizer that keeps the slots (a LossScaleOptimizer's inner one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def slot_name(attr):
    """`_velocities` -> `velocity`, `_momentums` -> `momentum`."""
    name = attr.lstrip("_")
    if name.endswith("ies"):
        return name[:-3] + "y"
    return name[:-1] if name.endswith("s") else name


def _slot_lists(inner, n, skip=("_trainable_variables", "_variables")):
    """[(slot name, [variable or None per weight])]: the optimizer's lists of one variable per
    weight (Keras 3 and tf_keras optimizers keep slots this way, e.g. `_velocities`)."""
    slots = []
    if not n:
        return slots
    for attr, value in sorted(vars(inner).items()):
        if attr in skip or not isinstance(value, list) or len(value) != n:
            continue
        if all(v is None or hasattr(v, "assign") for v in value) and any(
            v is not None for v in value
        ):
            slots.append((slot_name(attr), value))
    return slots


class Keras3:
    """`keras` 3 models and optimizers."""

    name = "Keras 3"
    apply_method = "apply"
    # Keras 3's LossScaleOptimizer.apply unscales the gradients itself: both gradient kinds
    # arrive scaled.
    loss_scaled_kinds = stats.GRADIENT_KINDS

    # -- layers ----------------------------------------------------------------------------------
    def children(self, layer):
        return list(getattr(layer, "_layers", []))

    def own_trainable_variables(self, layer):
        return list(getattr(layer, "_trainable_variables", []))

    def variable_name(self, variable):
        return variable.name

    def compiled_loss(self, model):
        return getattr(model, "_compile_loss", None)

    def layer_call(self, layer, original):
        """What a wrapper of `layer.call` calls as the original: Keras 3 calls `call` as is."""
        return original

    # -- optimizers ------------------------------------------------------------------------------
    def apply_arguments(self, optimizer, args, kwargs):
        """(grads, variables, args, kwargs) of a call to `apply(grads, trainable_variables)`,
        the iterables made lists so they can be read and still be passed on."""
        args, kwargs = list(args), dict(kwargs)
        grads = list(args.pop(0) if args else kwargs.pop("grads"))
        given = args.pop(0) if args else kwargs.pop("trainable_variables", None)
        given = list(given) if given is not None else None
        variables = (
            given
            if given is not None
            else list(getattr(inner_optimizer(optimizer), "_trainable_variables", []))
        )
        return grads, variables, [grads, given, *args], kwargs

    def built(self, optimizer):
        return bool(getattr(inner_optimizer(optimizer), "built", False))

    def build(self, optimizer, variables, strategy):
        optimizer.build(variables)

    def slot_count(self, optimizer):
        inner = inner_optimizer(optimizer)
        return len(_slot_lists(inner, len(getattr(inner, "_trainable_variables", []))))

    def variable_slots(self, optimizer, variables):
        """Per variable, [(slot name, slot variable)]."""
        inner = inner_optimizer(optimizer)
        slots = _slot_lists(inner, len(getattr(inner, "_trainable_variables", [])))
        out = []
        for v in variables:
            try:
                index = inner._get_variable_index(v)
            except (AttributeError, KeyError):
                index = None
            out.append(
                [
                    (name, slot_variables[index])
                    for name, slot_variables in slots
                    if index is not None and slot_variables[index] is not None
                ]
            )
        return out

    def loss_scale(self, optimizer):
        scale = getattr(optimizer, "dynamic_scale", None)
        if scale is None:
            return None
        return float(tf.convert_to_tensor(getattr(scale, "value", scale)).numpy())


class TfKeras(Keras3):
    """`tf_keras` (Keras 2) models and optimizers, the new ones and `optimizers.legacy`."""

    name = "tf_keras"
    apply_method = "apply_gradients"
    # tf_keras's LossScaleOptimizer gets weight gradients already unscaled; the gradients
    # w.r.t. layer outputs come from the tape on the scaled loss.
    loss_scaled_kinds = ("activation_grad",)

    def children(self, layer):
        return list(layer._flatten_layers(recursive=False, include_self=False))

    def own_trainable_variables(self, layer):
        return list(getattr(layer, "_trainable_weights", []))

    def variable_name(self, variable):
        """`dense/kernel:0` -> `kernel`, the name Keras 3 gives the same weight."""
        return variable.name.split(":")[0].rpartition("/")[2]

    def compiled_loss(self, model):
        return getattr(model, "compiled_loss", None)

    def layer_call(self, layer, original):
        """tf_keras runs a subclassed layer's `call` through autograph when tracing
        (`Layer._autographed_call`), so Python control flow on tensors works there.  It would
        convert our wrapper, which autograph must not touch: the wrapper converts the original."""
        should_convert = getattr(layer, "_should_use_autograph", None)
        if should_convert is None or not should_convert():
            return original
        converted = []
        # to_graph converts functions: a bound method is converted unbound and given its self.
        func, owner = getattr(original, "__func__", original), getattr(original, "__self__", None)

        def call(*args, **kwargs):
            if tf.executing_eagerly():
                return original(*args, **kwargs)
            if not converted:
                converted.append(tf.autograph.to_graph(func))
            if owner is not None:
                return converted[0](owner, *args, **kwargs)
            return converted[0](*args, **kwargs)

        return call

    def apply_arguments(self, optimizer, args, kwargs):
        """(grads, variables, args, kwargs) of `apply_gradients(grads_and_vars, ...)`."""
        args, kwargs = list(args), dict(kwargs)
        pairs = list(args.pop(0) if args else kwargs.pop("grads_and_vars"))
        return [g for g, _ in pairs], [v for _, v in pairs], [pairs, *args], kwargs

    @staticmethod
    def _legacy(optimizer):
        return hasattr(inner_optimizer(optimizer), "get_slot_names")

    def built(self, optimizer):
        if self._legacy(optimizer):
            return bool(getattr(inner_optimizer(optimizer), "_slots", None))
        return bool(getattr(inner_optimizer(optimizer), "_built", False))

    def build(self, optimizer, variables, strategy):
        # tf_keras builds its slots inside apply_gradients (legacy ones only there); a new
        # optimizer's are built here first, under the model's strategy so they are mirrored.
        if not self._legacy(optimizer):
            with strategy.scope():
                optimizer.build(variables)

    def slot_count(self, optimizer):
        inner = inner_optimizer(optimizer)
        if self._legacy(optimizer):
            return len(inner.get_slot_names())
        return len(_slot_lists(inner, len(getattr(inner, "_index_dict", {}))))

    def variable_slots(self, optimizer, variables):
        inner = inner_optimizer(optimizer)
        if self._legacy(optimizer):
            names = inner.get_slot_names()
            out = []
            for v in variables:
                pairs = []
                for name in names:
                    try:
                        slot = inner.get_slot(v, name)
                    except (KeyError, ValueError):
                        continue
                    pairs.append((LEGACY_SLOT_NAMES.get(name, name), slot))
                out.append(pairs)
            return out
        index_of = getattr(inner, "_index_dict", {})
        slots = _slot_lists(inner, len(index_of))
        if getattr(inner, "momentum", None) == 0:
            # tf_keras's SGD keeps momentum slots it never updates when momentum is 0 (Keras 3
            # keeps none): not watched, so both Kerases watch the same sites.
            slots = [(name, values) for name, values in slots if name != "momentum"]
        out = []
        for v in variables:
            index = index_of.get(inner._var_key(v))
            out.append(
                [
                    (name, slot_variables[index])
                    for name, slot_variables in slots
                    if index is not None and slot_variables[index] is not None
                ]
            )
        return out

    def loss_scale(self, optimizer):
        if not hasattr(optimizer, "inner_optimizer") or not hasattr(optimizer, "loss_scale"):
            return None
        return float(tf.convert_to_tensor(optimizer.loss_scale).numpy())


# tf_keras's legacy optimizers name Adam's slots m, v, vhat: the names the new optimizers use.
LEGACY_SLOT_NAMES = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat"}

KERAS3 = Keras3()
TF_KERAS = TfKeras()
_BY_LIBRARY = {"keras": KERAS3, "tf_keras": TF_KERAS}

# tf_keras wraps a TF1 `tf.compat.v1.train.Optimizer` in this (Keras 3 has a class of the
# same name, its TensorFlow optimizer base); its slots are the TF1 optimizer's: not supported.
_UNSUPPORTED_OPTIMIZERS = {"TFOptimizer"}


def of_model(model):
    """The flavour of a Keras model; UnsupportedError for anything else."""
    flavour = _BY_LIBRARY.get(_library(model))
    if flavour is None or not hasattr(model, "trainable_variables"):
        raise UnsupportedError(
            "tb_nanwatch: %s is neither a Keras 3 (`keras`) nor a tf_keras (Keras 2) model; "
            "nothing was wrapped" % type(model).__name__
        )
    return flavour


def looks_like_optimizer(obj):
    """Whether `obj` is an optimizer of either Keras (supported or not)."""
    return (
        _library(obj) is not None
        and hasattr(obj, "apply_gradients")
        and "Optimizer" in " ".join(_class_names(obj))
    )


def of_optimizer(optimizer):
    """The flavour of an optimizer; UnsupportedError, saying why, when it cannot be watched."""
    library = _library(optimizer)
    flavour = _BY_LIBRARY.get(library)
    if flavour is None or not hasattr(optimizer, flavour.apply_method):
        raise UnsupportedError(
            "tb_nanwatch: %s is not a Keras 3 or tf_keras optimizer (it has no %s method); "
            "nothing was wrapped"
            % (type(optimizer).__name__, flavour.apply_method if flavour else "apply")
        )
    if library == "tf_keras" and _class_names(optimizer) & _UNSUPPORTED_OPTIMIZERS:
        raise UnsupportedError(
            "tb_nanwatch: tf_keras's %s wraps a TF1 tf.compat.v1.train optimizer, which "
            "tb_nanwatch does not support; use a tf_keras optimizer (tf_keras.optimizers.Adam, "
            "or tf_keras.optimizers.legacy.Adam). Nothing was wrapped" % type(optimizer).__name__
        )
    return flavour
