"""Turns nanwatch records into runs x sites x rows.  TensorFlow-free.

Reads through a TensorBoard data provider, so the plugin (RustBoard or the
Python multiplexer behind `context.data_provider`) and the CLI (`open_logdir`,
`eventfile.LogdirProvider`) share every line of it.  Every record passes the
gate in `validation` first: a bad one is dropped and named in `RunData.warnings`
(run, tag, step), the rest is read.
"""

import logging

import numpy as np
from tensorboard import context as tb_context
from tensorboard.data import provider as tb_provider

from tb_nanwatch import metadata, runview, stats, validation

logger = logging.getLogger(__name__)

# read_tensors takes a sample cap; ask for everything that was kept.
_ALL = 2**31 - 1


RunNotFound = runview.RunNotFound

InvalidData = validation.InvalidData


class RunData(runview.SiteLookup):
    """Everything nanwatch logged for one (run, group).

    rows[i, s, k] is statistic `stats.STATS[k]` of site s in the row ending at
    steps[i]; flight rows likewise at step resolution.  `warnings`: one line per tag
    whose records were dropped by the gate, in words.
    """

    def __init__(
        self,
        run,
        group,
        sites,
        steps,
        rows,
        flight_steps,
        flight_rows,
        first_nonfinite,
        events,
        warnings=(),
    ):
        self.run = run
        self.group = group
        self.sites = sites
        self.steps = steps
        self.rows = rows
        self.flight_steps = flight_steps
        self.flight_rows = flight_rows
        self.first_nonfinite = first_nonfinite
        self.events = events
        self.warnings = list(warnings)
        # Writer sessions found in the run directory (a script re-run into it): when there
        # are several, everything above is the latest one's (see `sessions_of`).
        self.sessions = []
        # The state before step 0's update (`metadata.INITIAL`): float64 [n_sites, n_stats],
        # weights and optimizer slots measured, NaN elsewhere; None in logs that lack it.
        self.initial = None


def list_runs(provider, ctx, experiment_id):
    """{run: sorted list of groups (None for the default site list)} with any nanwatch
    record: rows, a flight recorder, or only a first-non-finite record (a run killed
    before its first row was due)."""
    listing = provider.list_tensors(
        ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME
    )
    out = {}
    for run, tags in listing.items():
        for tag in tags:
            parsed = metadata.parse_tag(tag)
            if parsed and parsed[0] not in out.get(run, []):
                out.setdefault(run, []).append(parsed[0])
    return {run: sorted(groups, key=lambda g: g or "") for run, groups in sorted(out.items())}


def run_series(provider, ctx, experiment_id, run, group=None):
    """{tag: TensorTimeSeries} of every nanwatch tag of (run, group), row blocks included:
    what `read_run` reads, and what a cache must watch for new data."""
    listing = provider.list_tensors(
        ctx,
        experiment_id=experiment_id,
        plugin_name=metadata.PLUGIN_NAME,
        run_tag_filter=tb_provider.RunTagFilter(runs=[run]),
    )
    return {
        tag: ts
        for tag, ts in listing.get(run, {}).items()
        if (metadata.parse_tag(tag) or (False,))[0] == group
    }


_Dropped = runview.Dropped


def read_run(provider, ctx, experiment_id, run, group=None):
    """The RunData of `run`: RunNotFound when it has no nanwatch record, InvalidData when
    none of its records can be read (the reasons in words), MetadataError when they were
    written by a newer tb_nanwatch."""
    tags = {record: metadata.tag(record, group) for record in metadata.RECORDS}
    series = run_series(provider, ctx, experiment_id, run, group)
    if not series:
        raise RunNotFound(
            "no nanwatch data for run %r%s" % (run, "" if group is None else " group %r" % group)
        )
    dropped = _Dropped()
    row_blocks = [
        t
        for _, t in sorted(
            (metadata.parse_block_tag(t)[2], t)
            for t in series
            if metadata.parse_tag(t)[1] == metadata.ROWS
        )
    ]
    # Every row block and the flight recorder carry the site list in their metadata; the
    # first that passes the gate serves all (a tag whose first record was lost has none).
    content = None
    for tag_name in row_blocks + [t for t in [tags[metadata.FLIGHT]] if t in series]:
        raw = series[tag_name].plugin_content
        if not raw:
            continue
        record = metadata.parse_tag(tag_name)[1]
        try:
            content = validation.content(raw, record)
            break
        except validation.InvalidData as e:
            dropped.add(tag_name, None, e)
    sites = content["sites"] if content else []
    stat_names = content["stats"] if content else list(stats.STAT_NAMES)

    raw = {}

    def read(tag_name):
        """The data of one tag, of the latest writer session only; a provider that cannot
        decode it (a damaged tensor) loses that tag, not the run."""
        if tag_name not in raw:
            raw[tag_name] = read_all(tag_name)
        return [(t, d) for t, d in raw[tag_name] if since is None or d.wall_time > since]

    def read_all(tag_name):
        try:
            got = provider.read_tensors(
                ctx,
                experiment_id=experiment_id,
                plugin_name=metadata.PLUGIN_NAME,
                downsample=_ALL,
                run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag_name]),
            ).get(run, {})
        except (ValueError, TypeError, OverflowError) as e:
            dropped.add(tag_name, None, "its records cannot be decoded: %s" % e)
            return []
        return [(tag_name, d) for d in got.get(tag_name, [])]

    def matrices(tag_names):
        found = [] if content is None else [x for t in tag_names for x in read(t)]
        # Protocol 2 rows carry a header line before the sites.
        lines = len(sites) + (1 if metadata.has_header(stat_names) else 0)
        got = []
        for tag_name, datum in found:
            problem = validation.matrix_problem(datum.numpy, lines, len(stat_names))
            if problem:
                dropped.add(tag_name, datum.step, problem)
            else:
                got.append((tag_name, datum))
        got.sort(key=lambda x: x[1].step)
        steps = np.array([d.step for _, d in got], dtype=np.int64)
        if not got:
            return steps, np.zeros((0, len(sites), len(stats.STATS)))
        rows = metadata.decode_rows(np.stack([d.numpy for _, d in got]), stat_names, steps)
        problems = validation.row_problems(steps, rows)
        for (tag_name, datum), problem in zip(got, problems):
            if problem:
                dropped.add(tag_name, datum.step, problem)
        keep = np.array([p is None for p in problems], dtype=bool)
        return steps[keep], rows[keep]

    with_content = [t for t in row_blocks if t in series]
    # A script re-run into the same directory writes a second session: keep the latest.
    since = None
    # Only records the gate would keep count: one malformed record (or a hostile step) must
    # not pass for a second session and hide the first.
    lines = len(sites) + (1 if metadata.has_header(stat_names) else 0)
    others = [
        d
        for r in (metadata.FLIGHT, metadata.FIRST_NONFINITE, metadata.EVENTS)
        if tags[r] in series
        for _, d in read(tags[r])
        if validation.is_step(d.step)
    ]
    session_rows = [
        d
        for t in with_content
        for _, d in read(t)
        if validation.is_step(d.step)
        and validation.matrix_problem(d.numpy, lines, len(stat_names)) is None
    ]
    sessions = sessions_of(session_rows, others) if content is not None else []
    if len(sessions) > 1:
        since = sessions[-2]["last_wall_time"]
    steps, rows = matrices(with_content)
    flight_steps, flight_rows = matrices(
        [tags[metadata.FLIGHT]] if tags[metadata.FLIGHT] in series else []
    )
    _, initial_rows = matrices([tags[metadata.INITIAL]] if tags[metadata.INITIAL] in series else [])
    first = None
    if tags[metadata.FIRST_NONFINITE] in series:
        for tag_name, datum in read(tags[metadata.FIRST_NONFINITE]):
            try:
                record, notes = validation.first_nonfinite(
                    validation.parse_json(datum.numpy, "the record"),
                    datum.step,
                    len(sites) if content else None,
                )
            except validation.InvalidData as e:
                dropped.add(tag_name, datum.step, e)
                continue
            for note in notes:
                dropped.add(tag_name, datum.step, "part of it: %s" % note)
            if first is None or record["step"] < first["step"]:
                first = record
    events = []
    if tags[metadata.EVENTS] in series:
        for tag_name, datum in sorted(read(tags[metadata.EVENTS]), key=lambda x: x[1].step):
            try:
                kept, n_bad = validation.events(validation.parse_json(datum.numpy, "the record"))
            except validation.InvalidData as e:
                dropped.add(tag_name, datum.step, e)
                continue
            if n_bad:
                dropped.add(
                    tag_name,
                    datum.step,
                    "%d event%s without a type or with a bad step"
                    % (n_bad, "" if n_bad == 1 else "s"),
                )
            events.extend(kept)
    warnings = dropped.words()
    if content is None and first is None and not events:
        raise InvalidData(
            "no readable nanwatch data in run %r%s: %s"
            % (
                run,
                "" if group is None else " group %r" % group,
                "; ".join(warnings) or "no site list",
            )
        )
    for line in warnings:
        logger.debug("run %s: %s", run, line)
    data = RunData(
        run, group, sites, steps, rows, flight_steps, flight_rows, first, events, warnings
    )
    data.sessions = sessions
    data.initial = initial_rows[-1] if len(initial_rows) else None
    return data


SESSION_GAP_SECONDS = 1.0


def read_run_summary(provider, ctx, experiment_id, run, group, series):
    """A RunData without rows (for the runs overview): the first non-finite record, the
    events and the last step, from their small records only.  `series`: the run's
    nanwatch tags (run_series).  Unlike read_run it does not tell writer sessions apart."""
    tags = {record: metadata.tag(record, group) for record in metadata.RECORDS}
    wanted = [tags[r] for r in (metadata.FIRST_NONFINITE, metadata.EVENTS) if tags[r] in series]
    got = (
        provider.read_tensors(
            ctx,
            experiment_id=experiment_id,
            plugin_name=metadata.PLUGIN_NAME,
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=wanted),
        ).get(run, {})
        if wanted
        else {}
    )
    first, events = None, []
    for datum in got.get(tags[metadata.FIRST_NONFINITE], []):
        try:
            record, _ = validation.first_nonfinite(
                validation.parse_json(datum.numpy, "the record"), datum.step
            )
        except validation.InvalidData:
            continue
        if first is None or record["step"] < first["step"]:
            first = record
    for datum in sorted(got.get(tags[metadata.EVENTS], []), key=lambda d: d.step):
        try:
            events.extend(validation.events(validation.parse_json(datum.numpy, "the record"))[0])
        except validation.InvalidData:
            continue
    empty = np.zeros((0, 0, len(stats.STATS)))
    data = RunData(
        run, group, [], np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty, first, events
    )
    row_steps = [
        ts.max_step for t, ts in series.items() if metadata.parse_tag(t)[1] == metadata.ROWS
    ]
    data.last_step = max(row_steps) if row_steps else None
    return data


def sessions_of(row_data, other_data=()):
    """Writer sessions in the rows of one run (TensorDatum with step and wall_time): in
    wall-time order, a session's rows have rising steps; a row whose step is not past
    every step before it starts another session (a re-run into the same directory; a
    resumed run continues its steps and stays one session).  [{first_step, last_step,
    rows, first_wall_time, last_wall_time}].

    TensorBoard's Python loader purges a tag's older rows when its steps go back, so the
    rows alone may show only the latest session: a record of `other_data` (flight, first
    non-finite, events) written before the first row yet at a later step than it cannot be
    of that session (a writer writes in step order) and stands for an earlier one."""
    sessions = []
    for d in sorted(row_data, key=lambda d: d.wall_time):
        last = sessions[-1] if sessions else None
        # The same step again within a second is one writer writing it twice (a row closed
        # at the first non-finite step); a re-run takes longer than that to start.
        if (
            last is None
            or d.step < last["last_step"]
            or (
                d.step == last["last_step"]
                and d.wall_time - last["last_wall_time"] > SESSION_GAP_SECONDS
            )
        ):
            sessions.append(
                dict(
                    first_step=int(d.step),
                    last_step=int(d.step),
                    rows=0,
                    first_wall_time=d.wall_time,
                    last_wall_time=d.wall_time,
                )
            )
        current = sessions[-1]
        current["last_step"] = int(d.step)
        current["rows"] += 1
        current["last_wall_time"] = d.wall_time
    if sessions:
        first = sessions[0]
        orphans = [
            d
            for d in other_data
            if d.wall_time < first["first_wall_time"] and d.step > first["first_step"]
        ]
        if orphans:
            sessions.insert(
                0,
                dict(
                    first_step=int(min(d.step for d in orphans)),
                    last_step=int(max(d.step for d in orphans)),
                    rows=0,
                    first_wall_time=min(d.wall_time for d in orphans),
                    last_wall_time=max(d.wall_time for d in orphans),
                ),
            )
    return sessions


session_words = runview.session_words


def producer_index(run_data, first):
    """Index into run_data.sites of the first non-finite record's site (see
    `runview.producer_index`)."""
    return runview.producer_index(run_data, first)


def first_nonfinite_json(run_data):
    """The `first_nonfinite` object of `report --json` and `/first_nonfinite`: the run's
    view's (`runview.RunView.first`), one rule for the record and for a run that lost it."""
    return runview.as_view(run_data).first


def open_logdir(logdir, on_bytes=None):
    """(provider, ctx, experiment_id) for a logdir on disk: the CLI's view of it.

    `eventfile.LogdirProvider` reads every intact record (past damage that stops
    TensorBoard's own loaders) and says in `provider.damage[run]` what it skipped."""
    from tb_nanwatch import eventfile

    def orphan_plugin(tag_name):
        # A nanwatch tag whose first record (the one with the metadata) was lost.
        return metadata.PLUGIN_NAME if metadata.parse_tag(tag_name) else None

    provider = eventfile.LogdirProvider(
        logdir, [metadata.PLUGIN_NAME], orphan_plugin=orphan_plugin, on_bytes=on_bytes
    )
    return provider, tb_context.RequestContext(), ""
