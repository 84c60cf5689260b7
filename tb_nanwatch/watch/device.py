"""The writer's graph ops: what runs inside the user's (compiled) train step.

Per step, for every watched tensor, one L2 norm (`reduce_euclidean_norm` costs what
`reduce_sum` costs, and is non-finite whenever an element is): the only per-site ops.
Everything else is a fixed set of ops over all sites at once:

* the full statistics (exact NaN/+Inf/-Inf counts, finite min/max/sum/sum of
  squares, zeros, underflow) run in one functional `If`, only on a step that
  ends a row or whose norms say something is not finite.  Inside it the
  tensors are concatenated in chunks of at most `CHUNK_ELEMENTS` elements,
  chunk after chunk, and reduced per tensor with segment reductions, so the
  graph does not grow with the number of sites and a sampled step never holds
  a copy of every watched tensor at once;
* the accumulators, the first non-finite record, the flight-recorder ring and
  the poll vector the host reads are updated with one assign each.
"""

import weakref

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.ops import control_flow_util

from tb_nanwatch import stats
from tb_nanwatch.watch import host

HALF = (tf.float16, tf.bfloat16)
# Elements concatenated per chunk of the full statistics (16 MB of float32), and per block
# (a row of the chunk's matrix, reduced densely).
CHUNK_ELEMENTS = 1 << 22
BLOCK = 512
# A dimension unknown when the step is traced (the batch) counts as this much when chunks
# are planned; it only changes where chunks are cut, never a result.
_UNKNOWN_DIM = 32

# Raw moments of one tensor, combinable over tensors and replicas: the first ones add,
# min/max take their extreme.
MOMENTS = ("finite", "sum", "sumsq", "zeros", "under", "nan", "posinf", "neginf", "min", "max")
MOMENT = {name: i for i, name in enumerate(MOMENTS)}
_ADDED = len(MOMENTS) - 2

_ACCUMULATE = np.array(host.ACCUMULATE)


def dtype_limits(dtype):
    """(largest finite, smallest normal) of a float dtype."""
    dtype = tf.as_dtype(dtype)
    if dtype == tf.bfloat16:
        return 3.3895314e38, 1.1754944e-38
    info = np.finfo(dtype.as_numpy_dtype)
    return float(info.max), float(info.tiny)


class DeviceState:
    """The variables one Watch keeps on the device, sized for `capacity` sites.

    Created eagerly before the train step is traced (under the model's
    distribution strategy, so they are mirrored); every replica assigns the same
    combined values, so only the first replica's write is kept."""

    def __init__(self, capacity, flight_steps, replicas=1, gather=None, optimizers=1):
        def var(value):
            return tf.Variable(
                value,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_WRITE,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

        self.capacity = capacity
        # values of every replica, [replicas, ...] (distribute.ReplicaGather); None: the strategy's
        self.gather = gather
        self.poll = var(
            tf.constant(np.concatenate([[0, -1, 0, -1], np.full(capacity, np.nan)]), tf.float64)
        )
        # The last step of a fit() when Keras knows it: its partial row gets full statistics too.
        self.last_step = var(tf.constant(-1, tf.int64))
        self.acc = var(tf.constant(host.initial_accumulators(capacity)))
        # The first non-finite step's contributions, and who saw it under tf.distribute.
        self.first = var(tf.fill([capacity, len(stats.STATS)], np.float64(np.nan)))
        self.first_replicas = var(tf.zeros([replicas, capacity], tf.int64))
        # Flight recorder: per step, host.RING_STATS, until the first record freezes it.
        self.ring_step = var(tf.fill([flight_steps], tf.constant(-1, tf.int64)))
        self.ring = var(tf.zeros([flight_steps, capacity, len(host.RING_STATS)], tf.float64))
        # The learning rate each watched optimizer applied at the last step (NaN: none yet), read
        # by the host when it writes a row.
        self.learning_rates = var(tf.fill([optimizers], np.float64(np.nan)))
        # [1, -1], read in the step as a value Grappler cannot fold (see `flatten`).
        self.opaque_shape = var(tf.constant([1, -1], tf.int32))

    def reset_accumulators(self):
        self.acc.assign(host.initial_accumulators(self.capacity))


_constants = weakref.WeakKeyDictionary()


def _shared_constant(value, dtype):
    """One Const op per graph for a value used by every site (trace time grows with ops)."""
    graph = tf.compat.v1.get_default_graph()
    cache = _constants.setdefault(graph, {})
    key = (tf.as_dtype(dtype).name, np.asarray(value).tobytes(), np.shape(value))
    if key not in cache:
        cache[key] = tf.constant(value, dtype)
    return cache[key]


def flatten(tensor, opaque_shape=None):
    """A watched tensor as the step reads it: 1-D, half precision widened to float32 (a
    float16 sum of squares overflows at 65,504 and would raise false alarms).

    With `opaque_shape` ([1, -1] read from a variable), [1, n] instead, whose length Grappler's
    shape inference cannot know (nor merge the reshape away).  The statistics hold every
    watched tensor until they run, and Grappler's memory optimizer (SchedulingPass) counts
    what is live in its static schedule: past 80% of the device's memory limit (256 MB for a
    CPU) it turns each AddN of 3+ inputs with an input live at the peak into accumulating
    assigns, which round differently (ResNet50's gradient at conv1: its weights alone are
    100 MB, and the held gradients and activations doubled the estimate).  A tensor of unknown shape counts as
    one element there, so what the watch holds does not move that decision.  At run time it
    is the same reshape (no copy)."""
    size = tensor.shape.num_elements()
    if opaque_shape is None:
        flat = tf.reshape(tensor, _shared_constant([-1], tf.int32))
    else:
        flat = tf.reshape(tensor, opaque_shape)
        flat.set_shape([1, size])  # for the trace only (chunk plans)
    return tf.cast(flat, tf.float32) if flat.dtype in HALF else flat


def one_dimensional(piece):
    """A piece from `flatten` as 1-D (inside the statistics' branch: Grappler's estimate of
    the step's memory does not look there)."""
    if piece.shape.rank == 1:
        return piece
    return tf.reshape(piece, _shared_constant([-1], tf.int32))


def l2_norm(flat):
    """The once-per-step read of a piece from `flatten`.  `reduce_euclidean_norm` is one pass
    with no temporary, but XLA has no kernel for it; there the square fuses into the sum."""
    axis = _shared_constant(list(range(flat.shape.rank)), tf.int32)
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return tf.sqrt(tf.raw_ops.Sum(input=tf.square(flat), axis=axis))
    return tf.raw_ops.EuclideanNorm(input=flat, axis=axis)


def _sizes(pieces):
    """float64 [len(pieces)]: one constant for the static sizes, a Size op per dynamic one."""
    known = [p.shape.num_elements() for p in pieces]
    static = tf.constant([float(k) if k is not None else 0.0 for k in known], tf.float64)
    dynamic = [(i, tf.size(p)) for i, (p, k) in enumerate(zip(pieces, known)) if k is None]
    if not dynamic:
        return static
    return static + tf.scatter_nd(
        [[i] for i, _ in dynamic],
        tf.cast(tf.stack([d for _, d in dynamic]), tf.float64),
        [len(pieces)],
    )


def _planned_size(tensor):
    return int(
        np.prod([d if d is not None else _UNKNOWN_DIM for d in tensor.shape.as_list()] or [1])
    )


def plan_chunks(pieces):
    """Groups piece indices into chunks of one dtype and at most CHUNK_ELEMENTS planned
    elements (a bigger tensor is a chunk of its own), keeping execution order."""
    chunks, current, current_size, current_dtype = [], [], 0, None
    for i, piece in enumerate(pieces):
        size = _planned_size(piece)
        if current and (piece.dtype != current_dtype or current_size + size > CHUNK_ELEMENTS):
            chunks.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
        current_dtype = piece.dtype
    if current:
        chunks.append(current)
    return chunks


def _padding(piece):
    """(padding, blocks, filler): NaN elements that bring `piece` to a whole number of blocks, so
    that a block belongs to one piece; NaN is neutral to every finite-only statistic (the NaN
    count takes it back).  Python ints where the shape is static."""
    known = piece.shape.num_elements()
    if known is not None:
        pad = -known % BLOCK
        return (
            pad,
            (known + pad) // BLOCK,
            (_shared_constant(np.full(pad, np.nan), piece.dtype) if pad else None),
        )
    pad = tf.math.floormod(-tf.size(piece), BLOCK)
    return (
        pad,
        (tf.size(piece) + pad) // BLOCK,
        tf.fill(tf.reshape(pad, [1]), tf.constant(np.nan, piece.dtype)),
    )


def _chunk_moments(pieces, tiny):
    """float64 [len(pieces), len(MOMENTS)] of 1-D pieces of one dtype.

    The pieces, each padded to whole blocks of BLOCK elements, are laid out as one matrix
    [blocks, BLOCK]: dense reductions along its rows (as fast as one reduce_sum, where segment
    ops over elements are ten times slower), then the few per-block values per piece."""
    parts, pads, blocks = [], [], []
    for piece in pieces:
        pad, piece_blocks, filler = _padding(piece)
        parts.append(piece)
        if filler is not None:
            parts.append(filler)
        pads.append(pad)
        blocks.append(piece_blocks)
    x = tf.reshape(tf.concat(parts, 0) if len(parts) > 1 else parts[0], [-1, BLOCK])
    n = len(pieces)
    if all(isinstance(b, int) for b in blocks):
        block_piece = tf.constant(np.repeat(np.arange(n), blocks).astype(np.int32))
    else:
        block_piece = tf.repeat(tf.range(n), tf.stack([tf.cast(b, tf.int32) for b in blocks]))
    finite = tf.math.is_finite(x)

    def count(mask):  # exact: a block's count is at most BLOCK
        return tf.cast(tf.reduce_sum(tf.cast(mask, tf.float32), 1), tf.float64)

    wide = tf.cast(tf.where(finite, x, tf.zeros_like(x)), tf.float64)
    columns = {
        "finite": count(finite),
        "sum": tf.reduce_sum(wide, 1),
        "sumsq": tf.reduce_sum(tf.square(wide), 1),
        "zeros": count(tf.equal(x, 0)),
        "nan": count(tf.math.is_nan(x)),
        "posinf": count(tf.equal(x, np.inf)),
        "neginf": count(tf.equal(x, -np.inf)),
        "min": tf.cast(
            tf.reduce_min(tf.where(finite, x, tf.fill(tf.shape(x), tf.cast(np.inf, x.dtype))), 1),
            tf.float64,
        ),
        "max": tf.cast(
            tf.reduce_max(tf.where(finite, x, tf.fill(tf.shape(x), tf.cast(-np.inf, x.dtype))), 1),
            tf.float64,
        ),
    }
    if any(t > 0 for t in tiny):
        # NaN and Inf compare False: only finite elements count as underflow.
        threshold = tf.gather(tf.constant(tiny, x.dtype), block_piece)
        columns["under"] = count(tf.abs(x) < threshold[:, None])
    else:
        columns["under"] = tf.zeros_like(columns["finite"])
    per_block = tf.stack([columns[name] for name in MOMENTS], 1)
    moments = _combine(per_block, block_piece, n)
    # The padding was counted as NaN.
    padded = tf.cast(tf.stack([tf.cast(p, tf.int32) for p in pads]), tf.float64)
    return (
        moments - tf.one_hot(MOMENT["nan"], len(MOMENTS), dtype=tf.float64)[None] * padded[:, None]
    )


def _combine(moments, segment_ids, n):
    """Rows of MOMENTS combined per segment (blocks -> pieces -> sites, or replicas -> one);
    a segment with no rows gets no extremes (+inf min, -inf max)."""
    added = tf.math.unsorted_segment_sum(moments[:, :_ADDED], segment_ids, n)
    low = tf.math.unsorted_segment_min(moments[:, _ADDED : _ADDED + 1], segment_ids, n)
    high = tf.math.unsorted_segment_max(moments[:, _ADDED + 1 :], segment_ids, n)
    rows = tf.math.unsorted_segment_sum(tf.ones_like(moments[:, :1]), segment_ids, n) > 0
    return tf.concat(
        [
            added,
            tf.where(rows, low, tf.fill(tf.shape(low), np.float64(np.inf))),
            tf.where(rows, high, tf.fill(tf.shape(high), np.float64(-np.inf))),
        ],
        1,
    )


def site_moments(pieces, piece_site, tiny, n_sites):
    """float64 [n_sites, len(MOMENTS)]: chunk after chunk (control dependencies keep one
    chunk's copy alive at a time), then pieces combined into their sites."""
    if not pieces:
        return tf.constant(np.tile(_NO_MOMENTS, (n_sites, 1)))
    pieces = [one_dimensional(p) for p in pieces]
    out, previous = [], []
    for chunk in plan_chunks(pieces):
        with tf.control_dependencies(previous):
            moments = _chunk_moments([pieces[i] for i in chunk], [tiny[i] for i in chunk])
        out.append(moments)
        previous = [moments]
    moments = tf.concat(out, 0) if len(out) > 1 else out[0]
    return _combine(moments, tf.constant(piece_site, tf.int32), n_sites)


_NO_MOMENTS = np.array([np.inf if m == "min" else -np.inf if m == "max" else 0.0 for m in MOMENTS])


def finish(moments, sizes, largest, half):
    """Raw moments [n, len(MOMENTS)] -> (counts [n, 3], sampled [n, len(SAMPLED_STATS)] in the
    table's order, finite norm [n]) in float64."""
    m = lambda name: moments[:, MOMENT[name]]
    n = m("finite")
    has = n > 0
    nan = tf.fill(tf.shape(n), np.float64(np.nan))
    safe_size = tf.where(sizes > 0, sizes, tf.ones_like(sizes))
    mean = tf.math.divide_no_nan(m("sum"), n)
    std = tf.sqrt(tf.maximum(tf.math.divide_no_nan(m("sumsq"), n) - mean * mean, 0.0))
    max_abs = tf.maximum(tf.abs(m("min")), tf.abs(m("max")))
    headroom = tf.where(
        max_abs > 0,
        tf.math.log(tf.constant(largest, tf.float64) / max_abs) / np.log(2.0),
        tf.fill(tf.shape(n), np.float64(np.inf)),
    )
    values = {
        "min": m("min"),
        "max": m("max"),
        "mean": mean,
        "std": std,
        "max_abs": max_abs,
        "headroom": headroom,
    }
    values = {name: tf.where(has, value, nan) for name, value in values.items()}
    values["zero_frac"] = tf.where(sizes > 0, m("zeros") / safe_size, nan)
    values["underflow_frac"] = tf.where(
        tf.logical_and(tf.constant(half), sizes > 0), m("under") / safe_size, nan
    )
    sampled = tf.stack([values[name] for name in stats.SAMPLED_STATS], 1)
    counts = tf.stack([m(name) for name in stats.NONFINITE_STATS], 1)
    return counts, sampled, tf.sqrt(m("sumsq"))


def functional_cond(pred, true_fn, false_fn):
    """tf.cond kept as a functional If op: when lowered to Switch/Merge, every op of the
    branch not taken still runs as a dead node each step."""
    graph = tf.compat.v1.get_default_graph()
    if tf.executing_eagerly() or not hasattr(graph, "get_operations"):
        return tf.cond(pred, true_fn, false_fn)
    before = len(graph.get_operations())
    out = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[before:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return out


def gather_replicas(ctx, value, gather=None):
    """[replicas, ...] of `value` from every replica (just [1, ...] without distribution)."""
    if ctx is None:
        return value[None]
    if gather is not None:
        return gather(value)
    return ctx.all_gather(value[None], axis=0)


def record_learning_rates(state, learning_rates):
    """Keeps this step's learning rate per optimizer (None: that optimizer did not apply) in
    `state.learning_rates`: one assign of a few numbers per step, read only with a row."""
    n = state.learning_rates.shape[0]
    if not any(lr is not None for lr in learning_rates[:n]):
        return
    old = state.learning_rates.read_value()
    state.learning_rates.assign(
        tf.stack(
            [
                tf.cast(tf.reshape(lr, []), tf.float64) if lr is not None else old[i]
                for i, lr in enumerate((list(learning_rates) + [None] * n)[:n])
            ]
        )
    )


def device_step(state, tensors, dtypes, log_every, grad_sites=None):
    """One training step's graph ops.

    tensors: per site, the list of tensors it reads this step (empty: not computed);
    dtypes: per site, its dtype; grad_sites: per site, whether it is a gradient, when a
    LossScaleOptimizer skips steps whose only non-finite values are gradients.

    Returns (is_first, stopped): scalar bools, whether this step holds the run's first
    non-finite value, and whether this or an earlier step did (what stop mode rolls back)."""
    n, cap = len(tensors), state.capacity
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync == 1:
        ctx = None
    pieces, piece_site = [], []
    in_xla = control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    # XLA needs a constant shape (and Grappler does not rewrite what XLA compiles).
    opaque_shape = None if in_xla or tf.executing_eagerly() else state.opaque_shape.read_value()
    for site, site_tensors in enumerate(tensors):
        for t in site_tensors:
            pieces.append(flatten(t, opaque_shape))
            piece_site.append(site)
    piece_site = np.array(piece_site, dtype=np.int32)
    segments = tf.constant(piece_site, tf.int32)
    if pieces:
        # The once-per-step read: an L2 norm per tensor, in float64 from there on.
        norms = [l2_norm(p) for p in pieces]
        if len({n.dtype for n in norms}) > 1:  # a float64 site among float32 ones
            norms = [tf.cast(n, tf.float64) for n in norms]
        norms = tf.cast(tf.stack(norms), tf.float64)
        sizes = _sizes(pieces)
        local = tf.stack(
            [
                tf.math.unsorted_segment_sum(tf.square(norms), segments, n),
                tf.math.unsorted_segment_sum(sizes, segments, n),
            ],
            1,
        )
    else:
        local = tf.zeros([n, 2], tf.float64)
    # Collective 1: every replica learns the global norms, so all take the same branches below.
    global_ = tf.reduce_sum(gather_replicas(ctx, local, state.gather), 0)
    step_norm, site_sizes = tf.sqrt(global_[:, 0]), global_[:, 1]
    hint = tf.logical_not(tf.math.is_finite(step_norm))
    step = tf.cast(state.poll[host.POLL["steps_run"]], tf.int64)
    ends_row = tf.reduce_any(
        tf.stack(
            [
                tf.equal(tf.math.floormod(step + 1, log_every), 0),
                tf.equal(step, state.last_step),
                tf.equal(step, 0),
            ]
        )
    )
    ran_full = tf.logical_or(ends_row, tf.reduce_any(hint))

    tiny = [
        dtype_limits(dtypes[s])[1] if tf.as_dtype(dtypes[s]) in HALF else 0.0 for s in piece_site
    ]
    local_moments = functional_cond(
        ran_full,
        lambda: site_moments(pieces, piece_site, tiny, n),
        lambda: tf.zeros([n, len(MOMENTS)], tf.float64),
    )
    # Collective 2: moments combined over replicas; per replica, who saw a non-finite value.
    gathered = gather_replicas(ctx, local_moments, state.gather)
    nonfinite_columns = [MOMENT[name] for name in stats.NONFINITE_STATS]
    per_replica_nonfinite = tf.cast(
        tf.reduce_sum(tf.gather(gathered, nonfinite_columns, axis=2), -1) > 0, tf.int64
    )
    replicas = tf.shape(gathered)[0]
    moments = (
        _combine(tf.reshape(gathered, [-1, len(MOMENTS)]), tf.tile(tf.range(n), [replicas]), n)
        if ctx is not None
        else gathered[0]
    )
    largest = [dtype_limits(d)[0] for d in dtypes]
    half = [tf.as_dtype(d) in HALF for d in dtypes]
    counts, sampled, finite_norm = finish(moments, site_sizes, largest, half)
    counts = tf.where(ran_full, counts, tf.zeros_like(counts))
    sampled = tf.where(ran_full, sampled, tf.fill(tf.shape(sampled), np.float64(np.nan)))
    nonfinite = tf.reduce_sum(counts, axis=1) > 0
    # The norm of the finite elements: where the cheap norm was not finite (a NaN, or a float32
    # sum of squares past 3.4e38), the full statistics ran and give it in float64.
    norm = tf.where(hint, finite_norm, step_norm)

    # Loss scaling: a step whose only non-finite values are gradients is skipped by design.
    if grad_sites is not None:
        non_grad = tf.logical_and(nonfinite, tf.logical_not(tf.constant(grad_sites)))
        is_skip = tf.logical_and(tf.reduce_any(nonfinite), tf.logical_not(tf.reduce_any(non_grad)))
    else:
        is_skip = tf.constant(False)

    step64 = tf.cast(step, tf.float64)
    columns = {
        "steps": tf.ones([n], tf.float64),
        "size": site_sizes,
        "nonfinite_steps": tf.cast(nonfinite, tf.float64),
        "first_nonfinite_step": tf.where(
            nonfinite, tf.fill([n], step64), tf.fill([n], np.float64(np.inf))
        ),
        "norm": norm,
        "max_norm": norm,
    }
    for j, name in enumerate(stats.NONFINITE_STATS):
        columns[name] = counts[:, j]
    for j, name in enumerate(stats.SAMPLED_STATS):
        columns[name] = sampled[:, j]
    contribution = tf.stack([columns[s.name] for s in stats.STATS], 1)
    contribution = tf.pad(contribution, [[0, cap - n], [0, 0]], constant_values=np.nan)
    old = state.acc.read_value()
    rule = lambda name: tf.constant(_ACCUMULATE == name)
    state.acc.assign(
        tf.where(
            tf.logical_or(rule("replace"), tf.logical_and(rule("replace_sampled"), ran_full)),
            contribution,
            tf.where(
                rule("sum"),
                old + tf.where(tf.math.is_nan(contribution), tf.zeros_like(old), contribution),
                tf.where(
                    rule("max"),
                    tf.maximum(old, contribution),
                    tf.where(rule("min"), tf.minimum(old, contribution), old),
                ),
            ),
        )
    )

    # First non-finite of the run (not a loss-scale skip), and the flight recorder frozen with it.
    recording = state.poll[host.POLL["first_step"]] < 0
    is_first = tf.logical_and(
        recording, tf.logical_and(tf.reduce_any(nonfinite), tf.logical_not(is_skip))
    )
    state.first.assign(tf.where(is_first, contribution, state.first))
    state.first_replicas.assign(
        tf.where(
            is_first, tf.pad(per_replica_nonfinite, [[0, 0], [0, cap - n]]), state.first_replicas
        )
    )
    ring_size = state.ring_step.shape[0]
    slot = tf.one_hot(tf.math.floormod(step, ring_size), ring_size, on_value=True, off_value=False)
    write = tf.logical_and(slot, recording)
    state.ring_step.assign(tf.where(write, step, state.ring_step))
    now = tf.gather(contribution, [stats.STAT_INDEX[name] for name in host.RING_STATS], axis=1)
    state.ring.assign(tf.where(write[:, None, None], now[None], state.ring))
    poll = state.poll
    state.poll.assign(
        tf.concat(
            [
                tf.stack(
                    [
                        step64 + 1,
                        tf.where(is_first, step64, poll[host.POLL["first_step"]]),
                        poll[host.POLL["skips"]] + tf.cast(is_skip, tf.float64),
                        tf.where(is_skip, step64, poll[host.POLL["last_skip_step"]]),
                    ]
                ),
                contribution[:, stats.STAT_INDEX["norm"]],
            ],
            0,
        )
    )
    return is_first, tf.logical_or(is_first, tf.logical_not(recording))


def snapshot_rows(values):
    """float64 [len(values), n_stats] in the table's columns: the statistics of each tensor (a
    variable's value), computed eagerly by the step's own reductions, for the state training
    starts from.  Every statistic is measured; `steps`, `nonfinite_steps` and
    `first_nonfinite_step` are NaN (no step has run)."""
    n = len(values)
    out = np.full((n, len(stats.STATS)), np.nan)
    if not n:
        return out
    pieces = [flatten(tf.convert_to_tensor(v)) for v in values]
    dtypes = [tf.as_dtype(v.dtype) for v in values]
    tiny = [dtype_limits(d)[1] if d in HALF else 0.0 for d in dtypes]
    moments = site_moments(pieces, np.arange(n, dtype=np.int32), tiny, n)
    sizes = tf.constant([float(p.shape.num_elements()) for p in pieces], tf.float64)
    counts, sampled, norm = finish(
        moments, sizes, [dtype_limits(d)[0] for d in dtypes], [d in HALF for d in dtypes]
    )
    col = stats.STAT_INDEX
    out[:, col["size"]] = sizes.numpy()
    for j, name in enumerate(stats.NONFINITE_STATS):
        out[:, col[name]] = counts.numpy()[:, j]
    for j, name in enumerate(stats.SAMPLED_STATS):
        out[:, col[name]] = sampled.numpy()[:, j]
    out[:, col["norm"]] = out[:, col["max_norm"]] = norm.numpy()
    return out
