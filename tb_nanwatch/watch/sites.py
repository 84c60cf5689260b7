"""The site catalogue: which tensors of a traced step are watched, in execution order.

Sites, in execution order within a step: input, activations (forward order),
loss, then backward layer by layer (gradient w.r.t. the layer's output, then
its weight gradients), then per variable the optimizer slots and the updated
weight.  The first site of that order that holds a non-finite value is the
producer; later ones are propagators.
"""

import tensorflow as tf

from tb_nanwatch import summary
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


inner_optimizer = flavours.inner_optimizer


def float_tensors(structure):
    return [
        t for t in tf.nest.flatten(structure) if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]


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

    def add(layer, kind, tensor, getter, dtype="float32", shape=()):
        if kind in kinds:
            dtype = tf.as_dtype(dtype).name  # tf_keras gives a tf.DType, Keras 3 a name
            sites.append(summary.make_site(layer, kind, tensor, dtype, shape))
            getters.append(getter)

    if trace.inputs:
        add(model_name, "input", "", lambda tr: tr.inputs, *_describe(trace.inputs))
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
    owner = {}
    for path, layer in layer_order:
        for v in flavour.own_trainable_variables(layer):
            owner.setdefault(id(v), path)
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
                    flavour.variable_name(v),
                    lambda tr, i=i, j=j: gradient_values(tr.applies[i][1][j]),
                    v.dtype,
                    tuple(v.shape),
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
        slots = flavours.of_optimizer(optimizer).variable_slots(optimizer, variables)
        for v, variable_slots in zip(variables, slots):
            path, name = owner.get(id(v), model_name), flavour.variable_name(v)
            for slot_name, slot in variable_slots:
                add(
                    path,
                    "optimizer_state",
                    "%s/%s" % (slot_name, name),
                    lambda tr, s=slot: [variable_value(s)],
                    slot.dtype,
                    tuple(slot.shape),
                )
            add(path, "weight", name, lambda tr, v=v: [variable_value(v)], v.dtype, tuple(v.shape))
    return sites, getters


def capacity(layer_order, variables, optimizers):
    """An upper bound on the number of sites, known before the step is traced."""
    slots = 0
    for o in optimizers:
        flavour = flavours.of_optimizer(o)
        slots += flavour.slot_count(o) if flavour.built(o) else 4
    return 2 + 2 * len(layer_order) + len(variables) * (2 + max(slots, 1))
