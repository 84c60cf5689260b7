"""The host side of the writer: device state read back as numpy, turned into records.

Plain numpy, no TensorFlow, so every rule here is unit-tested on its own
(tests/test_watch_host.py): which site is the producer, which are propagators,
how the accumulators become a row in the table's columns, how the flight
recorder's ring becomes per-step rows, how the loss scale is divided out.

The accumulator matrix has one row per site and one column per statistic of
`stats.STATS`, in the table's order; see `ACCUMULATE` for how a step joins it.
"""

import numpy as np

from tb_nanwatch import stats

COLUMN = stats.STAT_INDEX

# How each step's value joins the accumulators, from the table: statistics measured at every
# step accumulate by their aggregation rule; last-step ones (the norm) are replaced at every
# step; sampled ones are replaced when the full statistics ran.
ACCUMULATE = tuple(
    "replace"
    if s.measured == "last_step"
    else "replace_sampled"
    if s.measured == "sampled"
    else s.aggregate
    for s in stats.STATS
)
# What an accumulator starts a row with: nothing seen.  first_nonfinite_step starts at +inf so
# that min() keeps the earliest; max_norm at -1 (norms are >= 0).
INITIAL = np.array(
    [
        np.inf
        if s.name == "first_nonfinite_step"
        else -1.0
        if s.name == "max_norm"
        else np.nan
        if s.measured != "every_step"
        else 0.0
        for s in stats.STATS
    ]
)

# What the flight recorder keeps per step and site, on the device (see device.DeviceState).
RING_STATS = ("nan", "posinf", "neginf", "norm")

# Poll vector the host reads each step: these, then the per-site norm of the last step.
POLL_FIELDS = ("steps_run", "first_step", "skips", "last_skip_step")
POLL = {name: i for i, name in enumerate(POLL_FIELDS)}


def initial_accumulators(capacity):
    return np.tile(INITIAL, (capacity, 1))


def row_from_accumulators(acc):
    """A row in the table's columns from the accumulator matrix [n_sites, n_stats]."""
    row = np.array(acc, dtype=np.float64, copy=True)
    present = row[:, COLUMN["size"]] > 0
    first = row[:, COLUMN["first_nonfinite_step"]]
    row[:, COLUMN["first_nonfinite_step"]] = np.where(
        np.isfinite(first) & (first >= 0), first, np.nan
    )
    row[:, COLUMN["max_norm"]] = np.where(
        row[:, COLUMN["max_norm"]] >= 0, row[:, COLUMN["max_norm"]], np.nan
    )
    row[:, COLUMN["steps"]] = np.nanmax(row[:, COLUMN["steps"]]) if len(row) else 0
    return _mask_absent(row, present)


# Columns that keep their value for a site that was not computed.
_ALWAYS = [COLUMN["steps"], COLUMN["size"]]
_VALUES = [i for i in range(len(stats.STATS)) if i not in _ALWAYS]


def _mask_absent(row, present):
    """A site not computed (off the gradient path: size 0) has no values, not zeros."""
    absent = np.flatnonzero(~present)
    row[np.ix_(absent, _VALUES)] = np.nan
    return row


def unscale_gradients(row, sites, loss_scale, kinds=stats.GRADIENT_KINDS):
    """Divides the loss scale out of the statistics of the sites of `kinds` (the gradients
    that were computed from the scaled loss), in the tensor's units."""
    if loss_scale is None or not loss_scale > 0:
        return row
    row = np.array(row, dtype=np.float64, copy=True)
    grads = np.array([s["kind"] in kinds for s in sites], dtype=bool)
    for name in stats.LOSS_SCALED_STATS:
        row[grads, COLUMN[name]] /= loss_scale
    return row


def nonfinite_sites(counts):
    """Indices of the sites with a NaN or Inf in `counts` [n_sites, 3], in execution order:
    the first is the producer, the others propagators."""
    counts = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    return [int(i) for i in np.flatnonzero(counts.sum(axis=1) > 0)]


def first_record(sites, first_row, consumers=None):
    """The first non-finite record from the accumulators' copy at that step, or None.

    `first_row` is [n_sites, n_stats] in the table's columns; `consumers` maps a layer path to
    the layers whose backward pass computed the gradient w.r.t. its output."""
    counts = np.nan_to_num(first_row[:, [COLUMN[name] for name in stats.NONFINITE_STATS]]).astype(
        np.int64
    )
    bad = nonfinite_sites(counts)
    if not bad:
        return None

    def describe(i):
        site = sites[i]
        out = dict(
            layer=site["layer"],
            kind=site["kind"],
            tensor=site["tensor"],
            **{name: int(counts[i, j]) for j, name in enumerate(stats.NONFINITE_STATS)},
        )
        if site["kind"] == "activation_grad":
            out["backward_of"] = list((consumers or {}).get(site["layer"], []))
        return out

    record = describe(bad[0])
    record.update(site=bad[0], propagators=[describe(i) for i in bad[1:]])
    return record


def replicas_of(record, per_replica_nonfinite, worker_names=()):
    """Adds who saw the producer under tf.distribute: replica ids, and the worker."""
    per_replica_nonfinite = np.asarray(per_replica_nonfinite)
    if per_replica_nonfinite.shape[0] <= 1:
        return record
    saw = [int(r) for r in np.flatnonzero(per_replica_nonfinite[:, record["site"]])]
    record = dict(record, replica=saw[0] if saw else None, replicas=saw)
    workers = len(worker_names)
    if workers > 1 and saw:
        per_worker = per_replica_nonfinite.shape[0] // workers
        record["worker"] = worker_names[min(saw[0] // per_worker, workers - 1)]
    return record


def flight_rows(ring_steps, ring, sizes, first_step, first_row):
    """(steps, rows) of the flight recorder up to and including `first_step`, ascending.

    ring_steps [R] (-1: slot unused), ring [R, n_sites, len(RING_STATS)]; each row covers one
    step; the first non-finite step's row is the full one recorded at that step."""
    ring_steps = np.asarray(ring_steps)
    order = [
        int(i) for i in np.argsort(ring_steps, kind="stable") if 0 <= ring_steps[i] <= first_step
    ]
    sizes = np.asarray(sizes, dtype=np.float64)
    steps, rows = [], []
    for i in order:
        step = int(ring_steps[i])
        if step == first_step:
            row = np.array(first_row, dtype=np.float64, copy=True)
        else:
            row = np.full((len(sizes), len(stats.STATS)), np.nan)
            row[:, COLUMN["size"]] = sizes
            for j, name in enumerate(RING_STATS):
                row[:, COLUMN[name]] = ring[i][:, j]
            row[:, COLUMN["max_norm"]] = row[:, COLUMN["norm"]]
            nonfinite = np.nan_to_num(ring[i][:, :3]).sum(axis=1) > 0
            row[:, COLUMN["nonfinite_steps"]] = nonfinite.astype(np.float64)
            row[:, COLUMN["first_nonfinite_step"]] = np.where(nonfinite, float(step), np.nan)
        row[:, COLUMN["steps"]] = 1
        steps.append(step)
        rows.append(_mask_absent(row, sizes > 0))
    return steps, rows


def row_due(steps_run, last_row_step, log_every):
    """Whether a row ends at the last step run: rows end at step 0 (the state training starts
    from) and at every step s with (s + 1) % log_every == 0, as the device samples them."""
    if steps_run <= 0:
        return False
    return last_row_step < 0 or steps_run // log_every > (last_row_step + 1) // log_every
