"""The site catalogue: which tensors of a traced step are watched, in execution order.

Sites, in execution order within a step: input, activations (forward order),
loss, then backward layer by layer (gradient w.r.t. the layer's output, then
its weight gradients), then per variable the optimizer slots and the updated
weight.  The first site of that order that holds a non-finite value is the
producer; later ones are propagators.
"""

import tensorflow as tf

from tb_nanwatch import summary


def layer_paths(model):
    """[(path, layer)] of every layer below the root, depth first in definition order;
    paths are the user's names joined by '/', e.g. 'encoder/block_2/dense'."""
    out, seen = [], set()

    def visit(layer, prefix):
        for child in getattr(layer, "_layers", []):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            out.append((path, child))
            visit(child, path + "/")

    visit(model, "")
    return out


def slot_name(attr):
    """`_velocities` -> `velocity`, `_momentums` -> `momentum`."""
    name = attr.lstrip("_")
    if name.endswith("ies"):
        return name[:-3] + "y"
    return name[:-1] if name.endswith("s") else name


def inner_optimizer(optimizer):
    """The optimizer that keeps the slots (a LossScaleOptimizer's inner one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def optimizer_slots(optimizer):
    """[(slot name, [variable or None per trainable variable])] of a Keras 3 optimizer."""
    inner = inner_optimizer(optimizer)
    n = len(getattr(inner, "_trainable_variables", []))
    slots = []
    if not n:
        return slots
    for attr, value in sorted(vars(inner).items()):
        if (
            attr in ("_trainable_variables", "_variables")
            or not isinstance(value, list)
            or len(value) != n
        ):
            continue
        if all(v is None or hasattr(v, "assign") for v in value) and any(
            v is not None for v in value
        ):
            slots.append((slot_name(attr), value))
    return slots


def float_tensors(structure):
    return [
        t for t in tf.nest.flatten(structure) if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]


def named_float_tensors(structure, output_names=()):
    """[(name, tensor)] of the float tensors in `structure` (targets, sample weights), named by
    their place in it: "" for a lone tensor, key paths for dicts (`out_a`, `head/out_b`), and for
    a list or tuple the model's output name at that position when the lengths agree, else
    `output_<i>` (`output_1`: the second output)."""
    out = []

    def visit(value, path):
        if isinstance(value, dict):
            for key in sorted(value, key=str):  # tf.nest's order
                visit(value[key], path + [str(key)])
        elif isinstance(value, (list, tuple)):
            top = not path and len(output_names) == len(value)
            for i, item in enumerate(value):
                visit(item, path + [output_names[i] if top else "output_%d" % i])
        elif isinstance(value, tf.Tensor) and value.dtype.is_floating:
            out.append(("/".join(path), value))

    visit(structure, [])
    return out


def _nth(pairs, i):
    """The tensor of the i-th (name, tensor) pair of this step, as a site reads it."""
    return [pairs[i][1]] if i < len(pairs) else []


def gradient_values(grad):
    """The tensors of one weight's gradient: none if it is not on the gradient path; for a
    sparse (embedding) gradient, its rows, not a dense copy of the whole table."""
    if grad is None:
        return []
    return [grad.values if isinstance(grad, tf.IndexedSlices) else grad]


def variable_value(variable):
    """The tf value of a Keras or tf variable."""
    return tf.convert_to_tensor(getattr(variable, "value", variable))


def reads_variable(variable):
    """A site's getter that reads `variable` (a weight or an optimizer slot); it carries the
    variable as `.variable`, so the state before the first update can be matched to the site."""

    def getter(trace):
        return [variable_value(variable)]

    getter.variable = variable
    return getter


def watched_variables(model, optimizers):
    """Every variable a site may read: the model's trainable weights and the slots of every
    optimizer already built (an unbuilt one creates its slots in the first step)."""
    out = list(model.trainable_variables)
    for optimizer in optimizers:
        if getattr(inner_optimizer(optimizer), "built", False):
            for _, slot_variables in optimizer_slots(optimizer):
                out.extend(v for v in slot_variables if v is not None)
    return out


# Layer attributes that hold a weight of a known role (stats.WEIGHT_ROLES).
_ROLE_ATTRIBUTES = (
    ("embeddings", "embedding"),
    ("recurrent_kernel", "recurrent_kernel"),
    ("gamma", "norm_scale"),
    ("beta", "norm_shift"),
    ("kernel", "kernel"),
    ("depthwise_kernel", "kernel"),
    ("pointwise_kernel", "kernel"),
    ("bias", "bias"),
)


def weight_role(layer, variable):
    """What `variable` is to `layer` (the layer that created it): the layer attribute that holds
    it, else by rank (`matrix` for a custom add_weight of 2+ dimensions, `vector` otherwise)."""
    for attr, role in _ROLE_ATTRIBUTES:
        try:
            held = getattr(layer, attr, None)
        except Exception:  # a property that cannot be computed (an unbuilt or exotic layer)
            continue
        if held is variable:
            return role
    return "matrix" if len(variable.shape) >= 2 else "vector"


def _describe(tensors):
    if not tensors:
        return "float32", ()
    t = tensors[0]
    return t.dtype.name, tuple(t.shape.as_list()) if t.shape.rank is not None else ()


def _order_owner(path, recorded):
    """The layer whose place in the backward order a weight of `path` takes: itself if its
    output was watched, else its nearest watched ancestor (an RNN cell runs inside its
    layer's loop, and its weights' gradients are computed in that layer's backward pass)."""
    while path and path not in recorded:
        path = path.rpartition("/")[0]
    return path


def build(trace, model_name, layer_order, kinds):
    """(sites, getters): the site list of a traced step, in execution order, and per site a
    function of the step trace giving the tensors it reads."""
    sites, getters = [], []

    def add(layer, kind, tensor, getter, dtype="float32", shape=(), role=None):
        if kind in kinds:
            sites.append(summary.make_site(layer, kind, tensor, dtype, shape))
            if role is not None:
                sites[-1]["role"] = role
            getters.append(getter)

    if trace.inputs:
        add(model_name, "input", "", lambda tr: tr.inputs, *_describe(trace.inputs))
    # What the loss consumes besides the model's output, before the forward pass.
    for kind, pairs in (("target", trace.targets), ("sample_weight", trace.sample_weights)):
        for i, (name, tensor) in enumerate(pairs):
            attr = "targets" if kind == "target" else "sample_weights"
            add(
                model_name,
                kind,
                name,
                lambda tr, a=attr, i=i: _nth(getattr(tr, a), i),
                *_describe([tensor]),
            )
    # A layer that also ran inside a nested graph (an RNN cell: once outside its layer's loop for
    # the output shape, then in the loop) is watched through the layer around it.
    forward = [path for path in trace.activations if path not in trace.nested]
    for path in forward:
        add(
            path,
            "activation",
            "",
            lambda tr, p=path: tr.activations.get(p, []),
            *_describe(trace.activations[path]),
        )
    if trace.losses or "loss" in kinds:
        add(model_name, "loss", "", lambda tr: tr.losses, *_describe(trace.losses))

    applied = [
        (i, j, v)
        for i, (_, _, variables) in enumerate(trace.applies)
        for j, v in enumerate(variables)
    ]
    recorded = set(forward)
    owner, role = {}, {}
    for path, layer in layer_order:
        for v in getattr(layer, "_trainable_variables", []):
            if id(v) not in owner:
                owner[id(v)] = path
                role[id(v)] = weight_role(layer, v)
    # Backward, layer by layer: the gradient arriving at a layer's output, then its weights'.
    recorded_grads = list(trace.activation_grads)
    reverse_forward = list(reversed(forward))
    if recorded_grads == [p for p in reverse_forward if p in trace.activation_grads]:
        backward = reverse_forward
    else:
        backward = recorded_grads + [p for p in reverse_forward if p not in trace.activation_grads]
    placed = set()

    def weight_grads_of(path):
        for i, j, v in applied:
            if _order_owner(owner.get(id(v), model_name), recorded) == path and id(v) not in placed:
                placed.add(id(v))
                add(
                    owner.get(id(v), model_name),
                    "weight_grad",
                    v.name,
                    lambda tr, i=i, j=j: gradient_values(tr.applies[i][1][j]),
                    v.dtype,
                    tuple(v.shape),
                    role.get(id(v)),
                )

    for path in backward:
        add(
            path,
            "activation_grad",
            "",
            lambda tr, p=path: tr.activation_grads.get(p, []),
            *_describe(trace.activations.get(path, [])),
        )
        weight_grads_of(path)
    for _, _, v in applied:  # weights no watched layer owns (e.g. the model's own), last
        weight_grads_of(_order_owner(owner.get(id(v), model_name), recorded))
    # Per optimizer, per variable as it updates them: its slots, then the new value.
    for optimizer, _, variables in trace.applies:
        inner = inner_optimizer(optimizer)
        slots = optimizer_slots(optimizer)
        for v in variables:
            path = owner.get(id(v), model_name)
            try:
                index = inner._get_variable_index(v)
            except (AttributeError, KeyError):
                index = None
            for name, slot_variables in slots:
                slot = slot_variables[index] if index is not None else None
                if slot is not None:
                    add(
                        path,
                        "optimizer_state",
                        "%s/%s" % (name, v.name),
                        reads_variable(slot),
                        slot.dtype,
                        tuple(slot.shape),
                        role.get(id(v)),
                    )
            add(path, "weight", v.name, reads_variable(v), v.dtype, tuple(v.shape), role.get(id(v)))
    return sites, getters


def capacity(layer_order, variables, optimizers, outputs=1):
    """An upper bound on the number of sites, known before the step is traced."""
    slots = sum(
        len(optimizer_slots(o)) if getattr(inner_optimizer(o), "built", False) else 4
        for o in optimizers
    )
    # input and loss, every layer's output and its gradient, a target and a sample weight per
    # output (and a few more for targets nested deeper than the outputs), every weight's sites.
    return 2 + 2 * len(layer_order) + 2 * max(1, outputs) + 8 + len(variables) * (2 + max(slots, 1))
