"""tf.distribute: which worker this process is, the names of all workers, and the all-gathers
that combine the replicas' statistics."""

import threading

import tensorflow as tf

# Private: the launcher of one replica's collectives, and the key numbering TF's own strategies
# use (no public API makes collectives in a group of one's own).
from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib
from tensorflow.python.distribute import cross_device_utils


def worker_names(strategy):
    """Task names of a multi-worker strategy in replica order ("chief_0", "worker_0", ...), else []."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or getattr(resolver, "task_type", None) is None:
        return []
    spec = resolver.cluster_spec().as_dict()
    return [
        "%s_%d" % (job, i) for job in ("chief", "worker") for i in range(len(spec.get(job, [])))
    ]


def this_worker(strategy):
    resolver = strategy.cluster_resolver
    return "%s_%d" % (resolver.task_type, resolver.task_id)


# The watch's all-gathers run in a collective group of its own.  Every strategy in a process
# numbers its collectives from the same start (group 1, instances 100, 101, ...), and the runtime
# remembers what each (group, instance) was: a second MirroredStrategy re-uses the first one's
# numbers, which only works while both issue the same collectives in the same order.  Gathers
# taken from the strategy's numbering broke that ("Collective instance 101 expected type 0 and
# data_type 1 but got type 2 and data_type 3").  In a group of their own, numbered once for the
# whole process, they meet no strategy's instance and leave the strategy's numbering as plain
# training has it.
GROUP_KEY_START = 1 << 30  # strategies start at 1 (TF's own tests add 100,000 per strategy)
_keys = None
_keys_lock = threading.Lock()


def _collective_keys():
    global _keys
    with _keys_lock:
        if _keys is None:
            _keys = cross_device_utils.CollectiveKeys(group_key_start=GROUP_KEY_START)
        return _keys


def _strategy_launchers(strategy):
    """The per-device launchers of the collectives a strategy runs itself, or None when it
    runs none (one device, a parameter server, reduction by copies to one device, a TPU)."""
    extended = getattr(strategy, "extended", None)
    for name in ("_collective_ops", "_cross_device_ops"):  # Mirrored, MultiWorkerMirrored
        ops = getattr(extended, name, None)
        if isinstance(ops, cross_device_ops_lib.CollectiveAllReduce):
            launchers = getattr(ops, "_launchers", None)
            if launchers and len(launchers) == len(extended.worker_devices):
                return launchers
    return None


class ReplicaGather:
    """All-gathers a value of the same shape from every replica of `strategy`, inside its
    replica context, as [replicas, ...] in replica order; just [1, ...] with one replica."""

    def __init__(self, strategy):
        self.strategy = strategy
        self._theirs = _strategy_launchers(strategy) if strategy is not None else None
        self._ours = {}
        self._lock = threading.Lock()

    def __call__(self, value):
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return value[None]
        if self._theirs is None or ctx.strategy is not self.strategy:
            return ctx.all_gather(value[None], axis=0)
        replica = tf.get_static_value(ctx.replica_id_in_sync_group)
        if replica is None:
            return ctx.all_gather(value[None], axis=0)
        local = self.strategy.extended._get_local_replica_id(int(replica))
        return self._launcher(local)._all_gather(value[None], None)

    def _launcher(self, local):
        with self._lock:  # replicas trace in threads of their own
            if local not in self._ours:
                keys = _collective_keys()
                devices = tuple(self.strategy.extended.worker_devices)
                launcher = cross_device_utils.CollectiveReplicaLauncher(
                    keys.get_group_key(devices),
                    self.strategy.num_replicas_in_sync,
                    keys,
                    devices[local],
                    self.strategy.extended._communication_options,
                )
                # The strategy's ordering token: on each device our gathers run after the
                # collectives the step issued before them, in the same order on every device
                # (NCCL deadlocks when two devices launch two collectives in different orders).
                theirs = getattr(self._theirs[local], "_ordering_token", None)
                if theirs is not None and getattr(launcher, "_ordering_token", None) is not None:
                    launcher._ordering_token = theirs
                self._ours[local] = launcher
            return self._ours[local]
