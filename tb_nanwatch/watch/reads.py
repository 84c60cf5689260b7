"""What the step reads, chosen so that reading changes nothing the step computes.

Grappler's arithmetic optimizer re-associates trees of one associative op whose inner
nodes have a single consumer: AddOpsRewrite folds Add/AddV2/AddN trees into one AddN plus
a broadcasting Add (a batch norm's `x * inv + (beta - mean * inv)` feeding a residual Add
becomes `(x * inv + shortcut) + (beta - mean * inv)`), MinimizeBroadcasts reorders Mul
trees (SGD's `lr * (dinv * rsqrt)` for a batch norm's gamma becomes `(lr * dinv) * rsqrt`).
A read is a second consumer: it keeps the tree as written, and the step rounds differently
from plain fit (MobileNetV2: 505 of 580 arrays differed after one step).  So the watch
reads a copy of such a node: the same op on the same inputs, marked with an attribute of
its own so that common-subgraph elimination does not merge it back; the original keeps
its consumers, and Grappler rewrites it as in plain fit.  The copy costs one elementwise op
per such tensor and step.
"""

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

_FAMILIES = (("Add", "AddV2", "AddN"), ("Mul",))
_FAMILY = {op_type: family for family in _FAMILIES for op_type in family}
# Forwarding ops Grappler prunes: the node behind them is the one that loses its rewrite.
_ALIASES = ("Identity", "IdentityN", "Snapshot")
_MARK = "_nanwatch_read"


def _unaliased(tensor):
    while tensor.op.type in _ALIASES and tensor.op.inputs:
        tensor = tensor.op.inputs[tensor.value_index if tensor.op.type == "IdentityN" else 0]
    return tensor


# What a consumer passes on unchanged, for the question "does this node feed a tree?".
_FORWARDERS = _ALIASES + ("Reshape", "Sum")


def _feeds_family(tensor, family, depth=4):
    """Whether `tensor` is an input of an op of `family` (through forwarding ops): an inner
    node of a tree Grappler may re-associate."""
    for consumer in tensor.consumers():
        if consumer.type in family:
            return True
        if (
            depth
            and consumer.type in _FORWARDERS
            and any(_feeds_family(out, family, depth - 1) for out in consumer.outputs)
        ):
            return True
    return False


def for_reading(tensor, copies, family=None):
    """`tensor`, or a bitwise-equal copy of it where reading it could block a rewrite.

    Inner nodes of the same family are copied too, as Grappler absorbs them into the same
    tree (inputs of another op type are leaves of the tree, read as they are).  `copies`
    memoises the copies made for one step."""
    if not isinstance(tensor, tf.Tensor) or tf.executing_eagerly():
        return tensor
    source = _unaliased(tensor)
    op = source.op
    if op.type not in _FAMILY or (family is not None and op.type not in family):
        return tensor
    if op.graph is not tf.compat.v1.get_default_graph():
        return tensor  # the step's own graph only
    if family is None and not _feeds_family(source, _FAMILY[op.type]):
        # The root of a tree (a swish's Mul feeding a conv) loses no rewrite when read, while
        # copying it would give its inputs a consumer more (and stop the swish fusion).
        return tensor
    if op.type == "Mul" and any(x.op.type == "Sigmoid" for x in op.inputs):
        # x * sigmoid(x): the remapper fuses it into one swish kernel only while the sigmoid has
        # that single consumer; a copy would be a second one (EfficientNet's layers).
        return tensor
    if id(source) not in copies:
        inputs = [for_reading(x, copies, _FAMILY[op.type]) for x in op.inputs]
        copies[id(source)] = _clone(op, inputs)
    return copies[id(source)]


def _clone(op, inputs):
    if op.type == "AddN":
        out = tf.raw_ops.AddN(inputs=inputs)
    else:
        out = getattr(tf.raw_ops, op.type)(x=inputs[0], y=inputs[1])
    out.op._set_attr(_MARK, attr_value_pb2.AttrValue(b=True))
    return out
