"""The site catalogue: which tensors of a traced step are watched, in execution order.

Sites, in execution order within a step: input, activations (forward order),
loss, then backward layer by layer (gradient w.r.t. the layer's output, then
its weight gradients), then per variable the optimizer slots and the updated
weight.  The first site of that order that holds a non-finite value is the
producer; later ones are propagators.
"""

import tensorflow as tf

from tb_nanwatch import stats, summary
from tb_nanwatch.watch import flavour as flavours


def layer_paths(model, flavour=flavours.KERAS3):
    """[(path, layer)] of every layer below the root, depth first in definition order;
    paths are the user's names joined by '/', e.g. 'encoder/block_2/dense'."""
    out, seen = [], set()

    def visit(layer, prefix):
        for child in flavour.children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            out.append((path, child))
            visit(child, path + "/")

    visit(model, "")
    return out


def call_name(path, n):
    """A layer's n-th call in one step: its first keeps the layer's name (`shared`), later
    ones are numbered (`shared (call 2)`), so each call is a site of its own, in execution
    order (a tied embedding, a shared Dense, a rotary embedding applied to queries and keys)."""
    return path if n == 1 else "%s (call %d)" % (path, n)


inner_optimizer = flavours.inner_optimizer


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
    """The tf value of a Keras 3 variable (`.value`) or a tf.Variable (tf_keras's weights)."""
    value = getattr(variable, "value", variable)
    return tf.convert_to_tensor(variable if callable(value) else value)


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
    variables = list(model.trainable_variables)
    out = list(variables)
    for optimizer in optimizers:
        flavour = flavours.of_optimizer(optimizer)
        if flavour.built(optimizer):
            for per_variable in flavour.variable_slots(optimizer, variables):
                out.extend(slot for _, slot in per_variable if _float_slot(slot))
    return out


def _float_slot(slot):
    """A slot with statistics to take: Adafactor keeps int32 placeholders for 1-D weights."""
    return slot is not None and tf.as_dtype(slot.dtype).is_floating


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
    # A custom layer that keeps it under another attribute may still name it by its role
    # (add_weight(name="recurrent_kernel")): the name, else the rank.
    return stats.weight_role({"tensor": variable.name, "shape": list(variable.shape)})


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


def build(trace, model_name, layer_order, kinds, flavour=flavours.KERAS3):
    """(sites, getters): the site list of a traced step, in execution order, and per site a
    function of the step trace giving the tensors it reads."""
    sites, getters = [], []

    def add(layer, kind, tensor, getter, dtype="float32", shape=(), role=None):
        if kind in kinds:
            dtype = tf.as_dtype(dtype).name  # tf_keras gives a tf.DType, Keras 3 a name
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

    def layer_of(call):
        return trace.layer_of.get(call, call)

    # A layer that also ran inside a nested graph (an RNN cell: once outside its layer's loop for
    # the output shape, then in the loop) is watched through the layer around it.
    forward = [call for call in trace.activations if layer_of(call) not in trace.nested]
    for call in forward:
        add(
            call,
            "activation",
            "",
            lambda tr, c=call: tr.activations.get(c, []),
            *_describe(trace.activations[call]),
        )
    if trace.losses or "loss" in kinds:
        add(model_name, "loss", "", lambda tr: tr.losses, *_describe(trace.losses))

    # A variable without a gradient in the apply (a train_step that built its gradient list
    # before the model was built) has no weight_grad site; its slots and value still do.
    applied = [
        (i, j, v)
        for i, (_, grads, variables) in enumerate(trace.applies)
        for j, v in enumerate(variables)
        if j < len(grads)
    ]
    recorded = {layer_of(call) for call in forward}
    owner, role = {}, {}
    for path, layer in layer_order:
        for v in flavour.own_trainable_variables(layer):
            if id(v) not in owner:
                owner[id(v)] = path
                role[id(v)] = weight_role(layer, v)
    # Backward, call by call: the gradient arriving at a call's output, then, after the last of
    # a layer's calls (its weights' gradients add up every call's), its weights'.
    watched = set(forward)
    recorded_grads = [call for call in trace.activation_grads if call in watched]
    reverse_forward = list(reversed(forward))
    if recorded_grads == [c for c in reverse_forward if c in trace.activation_grads]:
        backward = reverse_forward
    else:
        backward = recorded_grads + [c for c in reverse_forward if c not in trace.activation_grads]
    last_call = {layer_of(call): call for call in backward}
    placed = set()

    def weight_grads_of(path):
        for i, j, v in applied:
            if _order_owner(owner.get(id(v), model_name), recorded) == path and id(v) not in placed:
                placed.add(id(v))
                add(
                    owner.get(id(v), model_name),
                    "weight_grad",
                    flavour.variable_name(v),
                    lambda tr, i=i, j=j: gradient_values(tr.applies[i][1][j]),
                    v.dtype,
                    tuple(v.shape),
                    role.get(id(v)),
                )

    for call in backward:
        add(
            call,
            "activation_grad",
            "",
            lambda tr, c=call: tr.activation_grads.get(c, []),
            *_describe(trace.activations.get(call, [])),
        )
        if last_call[layer_of(call)] == call:
            weight_grads_of(layer_of(call))
    for _, _, v in applied:  # weights no watched layer owns (e.g. the model's own), last
        weight_grads_of(_order_owner(owner.get(id(v), model_name), recorded))
    # Per optimizer, per variable as it updates them: its slots, then the new value.
    for optimizer, _, variables in trace.applies:
        slots = flavours.of_optimizer(optimizer).variable_slots(optimizer, variables)
        for v, variable_slots in zip(variables, slots):
            path, name = owner.get(id(v), model_name), flavour.variable_name(v)
            for slot_name, slot in variable_slots:
                if not _float_slot(slot):
                    continue
                add(
                    path,
                    "optimizer_state",
                    "%s/%s" % (slot_name, name),
                    reads_variable(slot),
                    slot.dtype,
                    tuple(slot.shape),
                    role.get(id(v)),
                )
            add(path, "weight", name, reads_variable(v), v.dtype, tuple(v.shape), role.get(id(v)))
    return sites, getters


def capacity(layer_order, variables, optimizers, outputs=1):
    """The number of sites expected, known before the step is traced: an upper bound but for
    calls no graph shows (a layer that a subclassed layer calls several times, an unrolled RNN's
    cell), which the trace finds (Watch._ensure_capacity)."""
    slots = 0
    for o in optimizers:
        flavour = flavours.of_optimizer(o)
        slots += flavour.slot_count(o) if flavour.built(o) else 4
    # input and loss, every call's output and its gradient, a target and a sample weight per
    # output (and a few more for targets nested deeper than the outputs), every weight's sites.
    return (
        2
        + 2 * sum(expected_calls(layer_order).values())
        + 2 * max(1, outputs)
        + 8
        + len(variables) * (2 + max(slots, 1))
    )


def expected_calls(layer_order):
    """{path: calls per step} as the functional graphs show them: a layer's nodes (a shared
    Dense has two) times its parent's calls (a siamese encoder's layers run twice)."""
    calls = {}
    for path, layer in layer_order:  # a parent comes before its layers
        nodes = len(getattr(layer, "_inbound_nodes", None) or ())
        calls[path] = max(1, nodes) * calls.get(path.rpartition("/")[0], 1)
    return calls
