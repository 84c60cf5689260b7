"""Stop mode: the step whose values first go non-finite leaves no trace in the model's state.

Every variable the step may write (the model's weights and non-trainable variables, every
watched optimizer's variables: iteration counter, slots, loss scale) is read at the start of
the step (its *snapshot*), the step runs as written, and at its end one functional `If`
assigns the snapshots back when the device step saw a non-finite value (or an earlier step
did).  Nothing reaches the host: the test and the restore are ops of the step, under XLA and
under tf.distribute (each replica restores its own copy of a mirrored variable).

A snapshot is a read of the variable; the buffer it holds is the one the variable had.  An
in-place update (`assign_add`) of a variable whose buffer is still held must copy it first
(TensorFlow's copy-on-write), so in stop mode the optimizer's `assign_add`/`assign_sub` become
`assign(value + delta)`: the same elementwise sum into a new buffer, which the variable
adopts without a copy (see `Instrumentation._apply`).
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util, resource_variable_ops

from tb_nanwatch.watch import device


def tf_variable(variable):
    """The tf.Variable behind a Keras variable (or the variable itself)."""
    inner = getattr(variable, "_value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def local_copy(variable):
    """The variable this replica reads and writes: a mirrored variable's component on this
    replica's device in replica context, else the variable itself."""
    variable = tf_variable(variable)
    component = getattr(variable, "_get_on_device_or_primary", None)
    if component is not None and tf.distribute.has_strategy():
        if not tf.distribute.in_cross_replica_context():
            return component()
    return variable


class Snapshots:
    """Snapshots of one traced step, in the order they were taken; a variable's first
    snapshot (its value when the step began) is the one kept."""

    def __init__(self):
        self._taken = {}  # id(tf variable) -> (local variable, value)

    def take(self, variables):
        for variable in variables:
            if variable is None:
                continue
            local = local_copy(variable)
            key = id(tf_variable(variable))
            if key not in self._taken:
                self._taken[key] = (local, local.read_value())

    def __len__(self):
        return len(self._taken)

    def restore_if(self, pred):
        """Assigns every snapshot back when `pred` (a scalar bool tensor) holds."""
        pairs = list(self._taken.values())

        def restore():
            with tf.control_dependencies([local.assign(value) for local, value in pairs]):
                return tf.constant(True)

        def keep():
            return tf.constant(False)

        if not pairs:
            return None
        return device.functional_cond(pred, restore, keep)


def model_variables(model):
    """Every variable of the model a step can write (weights, moving statistics, RNG state)."""
    try:
        return list(model.variables)
    except Exception:  # pragma: no cover - a model that is not built yet has none
        return []


def optimizer_variables(optimizer):
    """Every variable of an optimizer (its iteration counter, slots; a LossScaleOptimizer's
    scale and counter and its inner optimizer's)."""
    return list(getattr(optimizer, "variables", []))


class BatchStore:
    """Device variables that keep the batch of the first non-finite step.

    They are written inside the step, only by the step that is found bad (a functional `If`),
    so a finite step copies nothing and nothing reaches the host until the record is read.
    One variable per named tensor of the batch and per replica (each keeps its own shard, on
    its own device, with no collective), of any shape (the last batch is smaller).  Under XLA
    a variable cannot change its shape: there the batch is kept only when its shape is fully
    known when the step is traced (`skipped` names the others)."""

    def __init__(self):
        self._variables = {}  # (name, replica) -> tf.Variable
        self.names = []  # in the order of the data's structure
        self.replicas = 1
        self.skipped = []  # (name, why)

    def _skip(self, name, why):
        if name not in [n for n, _ in self.skipped]:
            self.skipped.append((name, why))

    def keep_if(self, pred, named):
        """At trace time: the ops that copy `named` [(name, tensor)] when `pred` holds."""
        xla = control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
        context = tf.distribute.get_replica_context()
        replica, place = 0, None
        if context is not None and context.num_replicas_in_sync > 1:
            replica = tf.get_static_value(context.replica_id_in_sync_group)
            place = tf.nest.flatten(getattr(context, "devices", None) or [None])[0]
            if replica is None:
                for name, _ in named:
                    self._skip(name, "the replica is not known when the step is traced")
                return None
            self.replicas = context.num_replicas_in_sync
        kept = []
        for name, tensor in named:
            if not isinstance(tensor, tf.Tensor):
                continue
            static = tensor.shape.is_fully_defined()
            if xla and not static:
                self._skip(name, "its shape %s is not fully known under XLA" % tensor.shape)
                continue
            variable = self._variables.get((name, int(replica)))
            if variable is not None and xla and variable.shape != tensor.shape:
                continue  # another trace's shape; XLA would refuse the write
            if variable is None:
                variable = self._variables[(name, int(replica))] = _local_variable(
                    tensor.shape.as_list() if static else [0] * (tensor.shape.rank or 0),
                    tensor.dtype,
                    tensor.shape if xla else tf.TensorShape(None),
                    place,
                )
                if name not in self.names:
                    self.names.append(name)
            kept.append((variable, tensor))
        if not kept:
            return None

        def keep():
            with tf.control_dependencies([variable.assign(t) for variable, t in kept]):
                return tf.constant(True)

        return device.functional_cond(pred, keep, lambda: tf.constant(False))

    def read(self):
        """[(name, numpy array)] of what was kept (host side); under several replicas, the
        shards joined in replica order, as the global batch was split."""
        out = []
        for name in self.names:
            shards = [
                self._variables[(name, r)].numpy()
                for r in range(self.replicas)
                if (name, r) in self._variables
            ]
            out.append((name, shards[0] if len(shards) == 1 else np.concatenate(shards, 0)))
        return out


def _local_variable(initial_shape, dtype, shape, place):
    """A plain variable on `place`, created outside the step and outside any strategy: a
    ResourceVariable made directly goes past the strategy's variable creator (which would ask
    every replica to agree, from inside one replica's trace)."""
    with tf.init_scope(), tf.device(place):
        return resource_variable_ops.ResourceVariable(
            tf.zeros(initial_shape, dtype), shape=shape, trainable=False, name="nanwatch_batch"
        )
