"""Turns nanwatch records into runs x sites x rows.  TensorFlow-free.

Reads through a TensorBoard data provider, so the plugin (RustBoard or the
Python multiplexer behind `context.data_provider`) and the CLI (`open_logdir`)
share every line of it.
"""

import json
import logging

import numpy as np
from tensorboard import context as tb_context
from tensorboard.data import provider as tb_provider

from tb_nanwatch import metadata, stats

logger = logging.getLogger(__name__)

# read_tensors takes a sample cap; ask for everything that was kept.
_ALL = 2**31 - 1


class RunNotFound(KeyError):
    """No nanwatch data for this run (or group)."""

    def __str__(self):
        return self.args[0] if self.args else "run not found"


class RunData:
    """Everything nanwatch logged for one (run, group).

    rows[i, s, k] is statistic `stats.STATS[k]` of site s in the row ending at
    steps[i]; flight rows likewise at step resolution.
    """

    def __init__(self, run, group, sites, steps, rows, flight_steps, flight_rows,
                 first_nonfinite, events):
        self.run = run
        self.group = group
        self.sites = sites
        self.steps = steps
        self.rows = rows
        self.flight_steps = flight_steps
        self.flight_rows = flight_rows
        self.first_nonfinite = first_nonfinite
        self.events = events

    @property
    def labels(self):
        from tb_nanwatch.summary import site_label
        return [site_label(s) for s in self.sites]

    def site_index(self, layer, kind, tensor=""):
        for i, s in enumerate(self.sites):
            if s["layer"] == layer and s["kind"] == kind and s.get("tensor", "") == (tensor or ""):
                return i
        return None


def _to_table_columns(matrix, stat_names):
    """Maps columns named by the writer onto the current table (missing -> NaN)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if tuple(stat_names) == stats.STAT_NAMES:
        return matrix
    out = np.full(matrix.shape[:-1] + (len(stats.STATS),), np.nan)
    for j, name in enumerate(stat_names):
        if name in stats.STAT_INDEX:
            out[..., stats.STAT_INDEX[name]] = matrix[..., j]
    return out


def _decode_string(datum):
    value = datum.numpy
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return json.loads(value)


def list_runs(provider, ctx, experiment_id):
    """{run: sorted list of groups (None for the default site list)} with nanwatch rows
    (or, for a run killed before its first row was due, a flight recorder)."""
    listing = provider.list_tensors(ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME)
    out = {}
    for run, tags in listing.items():
        for tag in tags:
            parsed = metadata.parse_tag(tag)
            if parsed and parsed[1] in (metadata.ROWS, metadata.FLIGHT) and parsed[0] not in out.get(run, []):
                out.setdefault(run, []).append(parsed[0])
    return {run: sorted(groups, key=lambda g: g or "") for run, groups in sorted(out.items())}


def run_series(provider, ctx, experiment_id, run, group=None):
    """{tag: TensorTimeSeries} of every nanwatch tag of (run, group), row blocks included:
    what `read_run` reads, and what a cache must watch for new data."""
    listing = provider.list_tensors(ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
                                    run_tag_filter=tb_provider.RunTagFilter(runs=[run]))
    return {tag: ts for tag, ts in listing.get(run, {}).items()
            if (metadata.parse_tag(tag) or (False,))[0] == group}


def read_run(provider, ctx, experiment_id, run, group=None):
    """The RunData of `run`, or RunNotFound."""
    tags = {record: metadata.tag(record, group) for record in metadata.RECORDS}
    series = run_series(provider, ctx, experiment_id, run, group)
    row_blocks = sorted((metadata.parse_block_tag(t)[2], t) for t in series
                        if metadata.parse_tag(t)[1] == metadata.ROWS)
    if row_blocks:
        tags[metadata.ROWS] = row_blocks[0][1]
    # Both carry the site list; a run killed before its first row has only the flight recorder.
    with_sites = next((tags[r] for r in (metadata.ROWS, metadata.FLIGHT) if tags[r] in series), None)
    if with_sites is None:
        raise RunNotFound("no nanwatch data for run %r%s" % (run, "" if group is None else " group %r" % group))
    content = metadata.parse_plugin_metadata(series[with_sites].plugin_content)
    sites = content.get("sites", [])
    stat_names = content.get("stats", stats.STAT_NAMES)
    def read(tag_names):
        return provider.read_tensors(
            ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME, downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=tag_names)).get(run, {})

    data = read([tags[r] for r in (metadata.FLIGHT, metadata.FIRST_NONFINITE, metadata.EVENTS) if tags[r] in series])
    # One answer per block of rows: each stays far below the data provider's message limit.
    rows_data = [d for _, t in row_blocks for d in read([t]).get(t, [])]

    def matrices(record):
        candidates = rows_data if record == metadata.ROWS else data.get(tags[record], [])
        got = [d for d in candidates if np.ndim(d.numpy) == 2 and d.numpy.shape[0] == len(sites)]
        got.sort(key=lambda d: d.step)
        steps = np.array([d.step for d in got], dtype=np.int64)
        if not got:
            return steps, np.zeros((0, len(sites), len(stats.STATS)))
        return steps, _to_table_columns(np.stack([d.numpy for d in got]), stat_names)

    steps, rows = matrices(metadata.ROWS)
    flight_steps, flight_rows = matrices(metadata.FLIGHT)
    first = None
    for datum in data.get(tags[metadata.FIRST_NONFINITE], []):
        try:
            record = _decode_string(datum)
        except (ValueError, UnicodeDecodeError) as e:
            logger.warning("run %s: unreadable first_nonfinite record at step %s: %s", run, datum.step, e)
            continue
        if first is None or record.get("step", datum.step) < first.get("step", 0):
            first = record
    events = []
    for datum in sorted(data.get(tags[metadata.EVENTS], []), key=lambda d: d.step):
        try:
            events.extend(_decode_string(datum))
        except (ValueError, UnicodeDecodeError) as e:
            logger.warning("run %s: unreadable events record at step %s: %s", run, datum.step, e)
    return RunData(run, group, sites, steps, rows, flight_steps, flight_rows, first, events)


def producer_index(run_data, first):
    """Index into run_data.sites of the first non-finite record's site (its `site` field when
    it names the same layer/kind/tensor, else looked up by name), or None."""
    if not first:
        return None
    index = first.get("site")
    key = (first.get("layer"), first.get("kind"), first.get("tensor", "") or "")
    if isinstance(index, int) and 0 <= index < len(run_data.sites):
        s = run_data.sites[index]
        if (s["layer"], s["kind"], s.get("tensor", "")) == key:
            return index
    return run_data.site_index(*key)


FIRST_NONFINITE_FIELDS = ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf")


def first_nonfinite_json(run_data):
    """The `first_nonfinite` object of `report --json` and `/first_nonfinite`: the contract
    fields first (see FIRST_NONFINITE_FIELDS), then whatever else the writer recorded."""
    first = run_data.first_nonfinite
    if first is None:
        first = _first_from_rows(run_data)
    if first is None:
        return None
    out = {k: first.get(k, "" if k == "tensor" else 0) for k in FIRST_NONFINITE_FIELDS}
    for k, v in first.items():
        out.setdefault(k, v)
    return out


def _first_from_rows(run_data):
    """Fallback when the record itself was lost (e.g. an old or truncated file): the
    earliest first_nonfinite_step over all rows, in site (execution) order."""
    best = None
    # Steps the LossScaleOptimizer skipped hold non-finite gradients by design: without
    # the record, a run with skips can only be judged by its other sites.
    skipped = any(e.get("type") == "loss_scale_skip" for e in run_data.events if isinstance(e, dict))
    eligible = np.array([not (skipped and s["kind"] in ("activation_grad", "weight_grad"))
                         for s in run_data.sites], dtype=bool)
    for steps, rows in ((run_data.flight_steps, run_data.flight_rows), (run_data.steps, run_data.rows)):
        if len(steps) == 0:
            continue
        first_col = rows[..., stats.STAT_INDEX["first_nonfinite_step"]]
        candidates = np.where(eligible[None, :] & ~np.isnan(first_col), first_col, np.inf)
        # argmin takes the first in row-major order: earliest row, then execution order.
        i, s = np.unravel_index(np.argmin(candidates), candidates.shape)
        if np.isfinite(candidates[i, s]) and (best is None or candidates[i, s] < best[0]):
            best = (int(candidates[i, s]), int(s), int(i), rows)
    if best is None:
        return None
    step, s, i, rows = best
    site = run_data.sites[s]
    row = rows[i, s]
    return dict(step=step, layer=site["layer"], kind=site["kind"], tensor=site.get("tensor", ""),
                nan=int(np.nan_to_num(row[stats.STAT_INDEX["nan"]])),
                posinf=int(np.nan_to_num(row[stats.STAT_INDEX["posinf"]])),
                neginf=int(np.nan_to_num(row[stats.STAT_INDEX["neginf"]])),
                source="rows")


def open_logdir(logdir):
    """(provider, ctx, experiment_id) for a logdir on disk, as TensorBoard's Python
    loader reads it, keeping every record (the CLI's view of a logdir)."""
    from tensorboard.backend.event_processing import data_provider as tb_data_provider
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance={event_accumulator.TENSORS: 0}, max_reload_threads=1)
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = tb_data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    return provider, tb_context.RequestContext(), ""
