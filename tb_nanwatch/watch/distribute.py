"""tf.distribute: which worker this process is, and the names of all workers."""


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
