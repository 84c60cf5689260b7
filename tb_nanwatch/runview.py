"""What is true about one run, worked out once per version of its data.  TensorFlow-free.

Everything that answers about a run reads a `RunView`: the report's text, JSON and PNG,
the plugin's routes, the diagnosis, the warning signs and the early warning.  So the CLI
and the tab agree by construction: the first non-finite record under one rule, its
producer and propagators, the steps watched, loss-scale skips counted one way, the
writer-session warning, and one timeline of logged rows and flight rows.

A view holds what it shows, not the run: its rows are a `timeline.Timeline` (bounded,
whatever the run's length), built by `RunBuilder` as the run's records are read, block by
block (`from_files`, the run's own files, read incrementally; or `from_run_data`, rows a
TensorBoard data provider already holds).  A zoomed window that needs finer rows than the
view keeps is read again from the run's files (`RunView.rows_in`).
"""

import os
import struct
import threading

import numpy as np
from tensorboard.compat.proto import event_pb2

from tb_nanwatch import eventfile, metadata, runfiles, stats, timeline, validation

LOSS_SCALE_SKIP = "loss_scale_skip"
EARLY_WARNING = "early_warning"
FIRST_NONFINITE_FIELDS = ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf")
# A re-run into the same directory starts a new writer session when a row's step is not
# past the last one's; the same step again within this many seconds is one writer writing
# it twice (a row closed at the first non-finite step).
SESSION_GAP_SECONDS = 1.0
# Rows decoded at a time (validated and folded as one block).
BLOCK_ROWS = 256
# A zoomed window is read again from the run's files when it spans at most this many
# logged rows per column asked for (folded to the columns as read); wider windows are
# shown at the resolution the view keeps.
WINDOW_READ_ROWS_PER_COLUMN = 8


class RunNotFound(KeyError):
    """No nanwatch data for this run (or group)."""

    def __str__(self):
        return self.args[0] if self.args else "run not found"


InvalidData = validation.InvalidData


class Dropped:
    """Records (or parts of records) the gate dropped, said once per tag: `tag nanwatch/rows:
    record at step 24 dropped (shape [5, 16], expected [5, 17]); and 3 more (steps 25, 26, 27)`."""

    def __init__(self):
        self.by_tag = {}

    def add(self, tag, step, what):
        found = self.by_tag.setdefault(tag, [])
        if len(found) < 1000:  # a run damaged throughout says so without growing
            found.append((step, str(what)))

    def words(self):
        out = []
        for tag, found in self.by_tag.items():
            step, what = found[0]
            line = "tag %s: %s dropped (%s)" % (
                tag,
                "metadata" if step is None else "record at step %d" % step,
                what,
            )
            if len(found) > 1:
                more = [s for s, _ in found[1:] if s is not None]
                line += "; and %d%s more%s" % (
                    len(found) - 1,
                    "+" if len(found) >= 1000 else "",
                    " (steps %s%s)"
                    % (", ".join(str(s) for s in more[:5]), ", ..." if len(more) > 5 else "")
                    if more
                    else "",
                )
            out.append(line)
        return out


class _Index:
    """Where each logged row of the current session is: step, wall time, file, offset."""

    def __init__(self):
        self.paths = []
        self._path_ids = {}
        self.steps = np.zeros(1024, np.int64)
        self.files = np.zeros(1024, np.int32)
        self.offsets = np.zeros(1024, np.int64)
        self.n = 0

    def add(self, step, path, offset):
        if self.n == len(self.steps):
            for name in ("steps", "files", "offsets"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        pid = self._path_ids.get(path)
        if pid is None:
            pid = self._path_ids[path] = len(self.paths)
            self.paths.append(path)
        self.steps[self.n], self.files[self.n], self.offsets[self.n] = step, pid, offset
        self.n += 1

    def between(self, lo, hi):
        """Indices of the rows whose last step is in [lo, hi]."""
        steps = self.steps[: self.n]
        return np.arange(np.searchsorted(steps, lo, "left"), np.searchsorted(steps, hi, "right"))


class RunBuilder:
    """Folds one (run, group)'s records into what its RunView needs, as they are read.

    Records come in file order: `add_event` per Event (from `runfiles`), or `add_run_data`
    with rows already decoded (a data provider).  `view()` makes the RunView of what was
    added so far; adding more and calling `view()` again is a reload of the new part only.
    """

    def __init__(self, run, group=None, run_dir=None):
        self.run, self.group, self.run_dir = run, group, run_dir
        self.content = None
        self.sites = []
        self.stat_names = list(stats.STAT_NAMES)
        self.timeline = None
        self.firsts = []  # (wall time, record)
        self.events = []  # (wall time, step, [events])
        self.sessions = []
        self.dropped = Dropped()
        self.index = _Index()
        self._pending = []  # rows read but not yet decoded: (tag, step, wall, array, path, offset)
        self._session_starts = []  # previous sessions' last wall times
        self._headless = []  # rows dropped for want of a site list: (tag, step)
        self._flight_pending = []  # flight rows as read (few): decoded when a view is made
        self._initial_pending = []  # the state before the first update, as read (one a session)
        # Set by add_run_data: what a data provider already decoded, taken as it is.
        self._provided = None  # {"warnings", "flight": (steps, rows), "initial"}

    # -- records in ---------------------------------------------------------------
    def add_event(self, event, path=None, offset=None):
        if not event.HasField("summary"):
            return
        for value in event.summary.value:
            parsed = metadata.parse_block_tag(value.tag)
            if parsed is None or parsed[0] != self.group:
                continue
            record = parsed[1]
            if value.HasField("metadata") and record in (
                metadata.ROWS,
                metadata.FLIGHT,
                metadata.INITIAL,
            ):
                self._take_content(value.tag, record, value.metadata.plugin_data.content)
            if not value.HasField("tensor"):
                continue
            array = _tensor(value, event.step, self.dropped)
            if array is None:
                continue
            if record == metadata.ROWS:
                self._pending.append((value.tag, event.step, event.wall_time, array, path, offset))
                if len(self._pending) >= BLOCK_ROWS:
                    self._flush_rows()
            elif record == metadata.FLIGHT:
                self._add_flight(value.tag, event.step, event.wall_time, array)
            elif record == metadata.INITIAL:
                self._initial_pending.append((value.tag, event.step, event.wall_time, array))
            elif record == metadata.FIRST_NONFINITE:
                self._add_first(value.tag, event.step, event.wall_time, array)
            elif record == metadata.EVENTS:
                self._add_events(value.tag, event.step, event.wall_time, array)

    def _take_content(self, tag, record, raw):
        if self.content is not None or not raw:
            return
        try:
            self.content = validation.content(bytes(raw), record)
        except validation.InvalidData as e:
            self.dropped.add(tag, None, e)
            return
        self.sites = self.content["sites"]
        self.stat_names = self.content["stats"]

    def _lines(self):
        return len(self.sites) + (1 if metadata.has_header(self.stat_names) else 0)

    def _decode(self, items):
        """(steps, rows as stored (`timeline`'s layout), kept items) of the row matrices that
        pass the gate.  Rows of another layout (protocol 1, another table) are mapped by
        column name onto this one."""
        good = []
        lines = self._lines()
        for item in items:
            tag, step, array = item[0], item[1], item[3]
            if not validation.is_step(step):
                self.dropped.add(tag, None, "a step of %r" % (step,))
                continue
            problem = validation.matrix_problem(array, lines, len(self.stat_names))
            if problem:
                self.dropped.add(tag, step, problem)
            else:
                good.append(item)
        empty = np.zeros((0, len(self.sites) + 1, len(timeline.DISK)), np.float32)
        if not good:
            return np.zeros(0, np.int64), empty, []
        steps = np.array([g[1] for g in good], dtype=np.int64)
        stacked = np.stack([g[3] for g in good])
        if tuple(self.stat_names) == timeline.DISK:
            stored = stacked.astype(np.float32, copy=False)
            problems = validation.stored_row_problems(steps, stored)
        else:
            table = metadata.decode_rows(stacked, self.stat_names, steps)
            problems = validation.row_problems(steps, table)
            stored = metadata.encode_rows(steps, table)
        keep = np.array([p is None for p in problems], dtype=bool)
        for item, problem in zip(good, problems):
            if problem:
                self.dropped.add(item[0], item[1], problem)
        return steps[keep], stored[keep], [g for g, k in zip(good, keep) if k]

    def _flush_rows(self):
        if self.content is None:
            # No site list yet (the record carrying it was lost): the flight recorder's may
            # still come.  Rows wait for it, up to a bound; past it the oldest are dropped.
            excess = len(self._pending) - 4 * BLOCK_ROWS
            if excess > 0:
                self._headless.extend((p[0], p[1]) for p in self._pending[:excess])
                del self._pending[:excess]
            return
        pending, self._pending = self._pending, []
        steps, rows, items = self._decode(pending)
        start = 0
        for i, item in enumerate(items):
            if self._new_session(item[1], item[2]):
                self._add_rows(steps[start:i], rows[start:i], items[start:i])
                start = i
                self._start_session(item)
            self._note_session(item[1], item[2])
        self._add_rows(steps[start:], rows[start:], items[start:])

    def _new_session(self, step, wall):
        if not self.sessions:
            self._start_session((None, step, wall))
            return False
        last = self.sessions[-1]
        return step < last["last_step"] or (
            step == last["last_step"] and wall - last["last_wall_time"] > SESSION_GAP_SECONDS
        )

    def _start_session(self, item):
        _, step, wall = item[:3]
        if self.sessions:
            self._session_starts.append(self.sessions[-1]["last_wall_time"])
        self.sessions.append(
            dict(
                first_step=int(step),
                last_step=int(step),
                rows=0,
                first_wall_time=wall,
                last_wall_time=wall,
            )
        )
        self.timeline = None
        self.index = _Index()

    def _note_session(self, step, wall):
        current = self.sessions[-1]
        current["last_step"] = int(step)
        current["rows"] += 1
        current["last_wall_time"] = wall

    def _since(self):
        """Records of earlier writer sessions end at this wall time (None: one session)."""
        return self._session_starts[-1] if self._session_starts else None

    def _add_rows(self, steps, rows, items):
        if not len(steps):
            return
        if self.timeline is None:
            self.timeline = timeline.Timeline(
                len(self.sites), until=self._until(), eligible=self._eligible()
            )
        # Rows come in the order written; a block may cross no session (split above).
        self.timeline.add(steps, rows)
        for step, item in zip(steps, items):
            if item[4] is not None:
                self.index.add(int(step), item[4], item[5])

    def _until(self):
        found = [
            r["step"] for wall, r in self.firsts if self._since() is None or wall > self._since()
        ]
        return min(found) if found else None

    def _eligible(self):
        if not self._skips():
            return None
        return np.array([s["kind"] not in stats.GRADIENT_KINDS for s in self.sites], dtype=bool)

    def _add_flight(self, tag, step, wall, array):
        self._flight_pending.append((tag, step, wall, array, None, None))

    def _add_first(self, tag, step, wall, array):
        try:
            parsed = validation.parse_json(array, "the record")
            record, notes = validation.first_nonfinite(
                parsed, step, len(self.sites) if self.content else None
            )
        except validation.InvalidData as e:
            self.dropped.add(tag, step, e)
            return
        for note in notes:
            self.dropped.add(tag, step, "part of it: %s" % note)
        self.firsts.append((wall, record))
        if self.timeline is not None and self.timeline.frozen_at is None:
            self.timeline.until = self._until()

    def _add_events(self, tag, step, wall, array):
        try:
            kept, n_bad = validation.events(validation.parse_json(array, "the record"))
        except validation.InvalidData as e:
            self.dropped.add(tag, step, e)
            return
        if n_bad:
            self.dropped.add(
                tag,
                step,
                "%d event%s without a type or with a bad step" % (n_bad, "" if n_bad == 1 else "s"),
            )
        self.events.append((wall, step, kept))

    def _skips(self):
        return any(
            isinstance(e, dict) and e.get("type") == LOSS_SCALE_SKIP
            for _, _, kept in self.events
            for e in kept
        )

    def add_run_data(self, data):
        """Everything of a `reader.RunData` (rows a data provider holds), in one go."""
        self.content = {"sites": data.sites}
        self.sites = data.sites
        self.sessions = list(getattr(data, "sessions", []))
        first = getattr(data, "first_nonfinite", None)
        self.firsts = [] if first is None else [(0.0, first)]
        self.events = [(0.0, None, list(getattr(data, "events", [])))]
        self._provided = {
            "warnings": list(getattr(data, "warnings", [])),
            "flight": (data.flight_steps, data.flight_rows),
            "initial": getattr(data, "initial", None),
        }
        self.timeline = timeline.Timeline(
            len(self.sites), until=self._until(), eligible=self._eligible()
        )
        for start in range(0, len(data.steps), BLOCK_ROWS):
            self.timeline.add_table_rows(
                data.steps[start : start + BLOCK_ROWS], data.rows[start : start + BLOCK_ROWS]
            )

    # -- the view -----------------------------------------------------------------
    def view(self, damage=()):
        """The RunView of everything added so far."""
        if self._pending:
            self._flush_rows()
        since = self._since()
        flight_steps, flight_rows = self._flight(since)
        firsts = [r for wall, r in self.firsts if since is None or wall > since]
        first = min(firsts, key=lambda r: r["step"]) if firsts else None
        events = [
            e
            for wall, _, kept in sorted(self.events, key=lambda x: (x[1] is None, x[1] or 0))
            if since is None or wall > since
            for e in kept
        ]
        warnings = (self._provided or {}).get("warnings", []) + self.dropped.words()
        headless = len(self._headless) + (len(self._pending) if self.content is None else 0)
        if headless:
            warnings.append(
                "%d row%s without a readable site list" % (headless, "" if headless == 1 else "s")
            )
        if self.content is None and first is None and not events:
            raise InvalidData(
                "no readable nanwatch data in run %r%s: %s"
                % (
                    self.run,
                    "" if self.group is None else " group %r" % self.group,
                    "; ".join(warnings) or "no site list",
                )
            )
        line = self.timeline
        if line is None:
            line = timeline.Timeline(len(self.sites))
        return RunView(
            self.run,
            self.group,
            self.sites,
            line,
            flight_steps,
            flight_rows,
            first,
            events,
            warnings,
            sessions=[dict(s) for s in self.sessions],
            initial=self._initial(since),
            index=self.index,
            damage=list(damage),
            stat_names=self.stat_names,
            run_dir=self.run_dir,
        )

    def _initial(self, since):
        """The latest session's `initial` row ([n_sites, n_stats], table layout), or None."""
        if self._provided is not None:
            return self._provided["initial"]
        pending = [p for p in self._initial_pending if since is None or p[2] > since]
        if self.content is None or not pending:
            return None
        steps, stored, _ = self._decode(pending[-1:])
        if not len(steps):
            return None
        return metadata.decode_rows(stored, timeline.DISK, steps)[0]

    def _flight(self, since):
        if self._provided is not None:
            return self._provided["flight"]
        pending = [p for p in self._flight_pending if since is None or p[2] > since]
        if self.content is None or not pending:
            return np.zeros(0, np.int64), np.zeros((0, len(self.sites), len(stats.STATS)))
        pending.sort(key=lambda p: p[1])
        steps, stored, _ = self._decode(pending)
        return steps, metadata.decode_rows(stored, timeline.DISK, steps)


def _tensor(value, step, dropped):
    """The numpy value of a summary tensor, or None (said in `dropped`)."""
    try:
        return eventfile.tensor_value(value.tensor)
    except eventfile.TensorRefused as e:
        dropped.add(value.tag, step, e)
        return None


class SiteLookup:
    """What RunView and reader.RunData share: site labels, a site by name, the session
    warning (`sites` and `sessions` are the subclass's)."""

    @property
    def labels(self):
        from tb_nanwatch.summary import site_label

        return [site_label(s) for s in self.sites]

    def site_index(self, layer, kind, tensor=""):
        for i, s in enumerate(self.sites):
            if s["layer"] == layer and s["kind"] == kind and s.get("tensor", "") == (tensor or ""):
                return i
        return None

    def session_warning(self):
        """One line naming the writer sessions when there are several, else None."""
        if len(self.sessions) < 2:
            return None
        return (
            "%d writer sessions in this run directory (%s); showing the latest only: write each "
            "run to its own directory"
            % (len(self.sessions), "; ".join(session_words(x) for x in self.sessions))
        )


class RunView(SiteLookup):
    """The facts of one (run, group) at one version of its data.

    `steps`/`rows`: the logged rows it keeps (every row of a short run; see `timeline`);
    `flight_steps`/`flight_rows`: the flight recorder; `timeline_steps`/`timeline_rows`:
    the one timeline of both, at step resolution around the blow-up, which the heatmap,
    the diagnosis and the early warning read.  `first` is the first non-finite record (or what the rows say when it was lost),
    `producer` its site index, `propagators` the sites it reached in its step."""

    def __init__(
        self,
        run,
        group,
        sites,
        line,
        flight_steps,
        flight_rows,
        first_nonfinite,
        events,
        warnings=(),
        sessions=(),
        index=None,
        damage=(),
        stat_names=None,
        initial=None,
        run_dir=None,
    ):
        self.run, self.group, self.sites = run, group, sites
        self.run_dir = run_dir  # the run's directory when read from its files, else None
        self.line = line
        self.flight_steps = np.asarray(flight_steps, dtype=np.int64)
        self.flight_rows = flight_rows
        self.steps, self.rows = line.rows()
        self.timeline_steps, self.timeline_rows = timeline.merge_flight(
            self.steps, self.rows, self.flight_steps, flight_rows
        )
        self.first_nonfinite = first_nonfinite
        self.events = [e for e in events if isinstance(e, dict)]
        self.warnings = list(warnings)
        self.sessions = list(sessions)
        # The state before step 0's update (`metadata.INITIAL`): [n_sites, n_stats], weights
        # and optimizer slots measured, NaN elsewhere; None in logs that lack it.
        self.initial = initial
        self.damage = list(damage)
        self._index = index
        self._stat_names = stat_names
        self.coarse = line.coarse
        self.n_logged_rows = line.n_rows
        self._columns = {}
        self.first = self._first_json()
        self.producer = producer_index(self, self.first)
        self.until = self.first["step"] if self.first else None
        self.propagators = self._propagators()
        self.steps_watched, self.last_step = self._steps_watched()
        self.skips = [e for e in self.events if e.get("type") == LOSS_SCALE_SKIP]
        self.skipped_steps = skipped_steps(self.skips)
        # Finite is not the same as training: did the loss go down (first and last rows)?
        self.loss_progress = (
            stats.loss_progress(self.sites, self.steps, self.rows) if self.first is None else None
        )
        self.other_events = [
            e for e in self.events if e.get("type") not in (LOSS_SCALE_SKIP, EARLY_WARNING)
        ]
        # [n_steps, n_sites]: the state that led up to the first non-finite value: rows that
        # end before its step, and in its step the sites that ran before the producer.
        n = len(self.sites)
        if self.until is None:
            self.before = np.ones((len(self.timeline_steps), n), bool)
        else:
            self.before = np.repeat((self.timeline_steps < self.until)[:, None], n, axis=1)
            if self.producer is not None:
                self.before[self.timeline_steps == self.until, : self.producer] = True

    # -- the facts ------------------------------------------------------------------------
    def _first_json(self):
        """The first non-finite object of `report --json` and `/first_nonfinite`: the
        contract fields first, then whatever else the writer recorded."""
        first = self.first_nonfinite
        if first is None:
            first = _first_from_rows(self)
        if first is None:
            return None
        out = {k: first.get(k, "" if k == "tensor" else 0) for k in FIRST_NONFINITE_FIELDS}
        for k, v in first.items():
            out.setdefault(k, v)
        return out

    def _propagators(self):
        """The sites the first non-finite value reached in its step, execution order."""
        if self.first is None:
            return []
        if isinstance(self.first.get("propagators"), list):
            return self.first["propagators"]
        # The record was lost (killed run): the rows still say which sites went non-finite
        # at that step: exactly in the flight row of that step.
        step = self.first["step"]
        col = stats.STAT_INDEX
        hit = np.nonzero(self.flight_steps == step)[0]
        if len(hit):
            row = self.flight_rows[hit[-1]]
            bad = stats.nonfinite_status(row)
            chosen = [s for s in range(len(self.sites)) if bad[s] in (1, 2, 3, 4)]
        else:
            later = np.nonzero(self.timeline_steps >= step)[0]
            if not len(later):
                return []
            row = self.timeline_rows[later[0]]
            chosen = [
                s for s in range(len(self.sites)) if row[s, col["first_nonfinite_step"]] == step
            ]
        out = []
        for s in chosen:
            if s == self.producer:
                continue
            site = self.sites[s]
            entry = dict(layer=site["layer"], kind=site["kind"], tensor=site.get("tensor", ""))
            for k in stats.NONFINITE_STATS:
                entry[k] = int(np.nan_to_num(row[s, col[k]]))
            out.append(entry)
        return out

    def _steps_watched(self):
        """(steps watched, last step): the steps the logged rows cover, plus flight steps after them."""
        watched = self.line.steps_watched
        last = self.line.last_step
        if len(self.flight_steps):
            after = self.flight_steps[self.flight_steps > (last if last is not None else -1)]
            watched += len(np.unique(after))
            last = max(last if last is not None else -1, int(self.flight_steps.max()))
        if self.first_nonfinite is not None and isinstance(self.first_nonfinite.get("step"), int):
            last = max(last if last is not None else -1, self.first_nonfinite["step"])
        return watched, last

    def state(self):
        """ "nonfinite", "skips" (finite but for loss-scale skips, by design) or "finite"."""
        if self.first is not None:
            return "nonfinite"
        return "skips" if self.skipped_steps else "finite"

    # -- columns over the timeline (the diagnosis and the early warning read these) -------
    def col(self, name):
        """[n_steps, n_sites] of one statistic over the timeline."""
        if name not in self._columns:
            c = stats.STAT_INDEX[name]
            self._columns[name] = (
                self.timeline_rows[..., c]
                if len(self.timeline_steps)
                else np.zeros((0, len(self.sites)))
            )
        return self._columns[name]

    def nonfinite(self):
        if "_nonfinite" not in self._columns:
            counts = sum(np.nan_to_num(self.col(k)) for k in stats.NONFINITE_STATS)
            self._columns["_nonfinite"] = counts > 0
        return self._columns["_nonfinite"]

    def finite_before(self, name):
        """The statistic where measured on a finite cell before the first non-finite step, else NaN."""
        values = self.col(name).copy()
        values[~self.before] = np.nan
        values[self.nonfinite()] = np.nan
        return values

    # -- zoomed windows -------------------------------------------------------------------
    def rows_in(self, first_step=None, last_step=None, max_rows=None):
        """(steps, rows) of the timeline overlapping [first_step, last_step]: the kept rows,
        or, where those are coarser than `max_rows` rows over the window allow, the logged
        rows read again from the run's files (folded to at most `max_rows`), the flight
        rows merged in."""
        steps, _, rows = timeline.select_rows(
            self.timeline_steps, self.timeline_rows, first_step, last_step
        )
        if (
            not self.coarse
            or (first_step is None and last_step is None)
            or self._index is None
            or not self._index.n
        ):
            return steps, rows
        kept_coarse = timeline.covered_steps(rows) > _row_span(self)
        limit = max_rows or 1000
        if not kept_coarse.any() or len(steps) >= limit:
            return steps, rows
        lo = 0 if first_step is None else first_step
        hi = np.iinfo(np.int64).max if last_step is None else last_step
        picked = self._index.between(lo, hi + _row_span(self))
        if not len(picked) or len(picked) > WINDOW_READ_ROWS_PER_COLUMN * limit:
            return steps, rows  # a window this wide is shown at the kept rows' resolution
        logged_steps, logged_rows = self._read_rows(picked, limit)
        merged_steps, merged_rows = timeline.merge_flight(
            logged_steps, logged_rows, self.flight_steps, self.flight_rows
        )
        out_steps, _, out_rows = timeline.select_rows(
            merged_steps, merged_rows, first_step, last_step
        )
        return out_steps, out_rows

    def logged_rows_in(self, first_step=None, last_step=None):
        """How many logged rows end within [first_step, last_step] (all of them: None)."""
        if first_step is None and last_step is None:
            return self.n_logged_rows
        lo = 0 if first_step is None else first_step
        hi = np.iinfo(np.int64).max if last_step is None else last_step
        if self._index is not None and self._index.n:
            return int(len(self._index.between(lo, hi)))
        return int(np.count_nonzero((self.steps >= lo) & (self.steps <= hi)))

    def _read_rows(self, picked, limit):
        """The logged rows at index positions `picked`, folded into at most `limit` rows
        (consecutive, equal counts), read and decoded a block at a time."""
        group_of = np.zeros(len(picked), dtype=np.int64)
        for g, part in enumerate(np.array_split(np.arange(len(picked)), min(limit, len(picked)))):
            group_of[part] = g
        decoder = RunBuilder(self.run, self.group)
        decoder.content = {"sites": self.sites}
        decoder.sites = self.sites
        decoder.stat_names = self._stat_names or list(stats.STAT_NAMES)
        folded = {}  # group -> (last step, row)
        handles = {}
        try:
            for start in range(0, len(picked), BLOCK_ROWS):
                items, groups = [], []
                for j in range(start, min(start + BLOCK_ROWS, len(picked))):
                    i = picked[j]
                    path = self._index.paths[self._index.files[i]]
                    if path not in handles:
                        handles[path] = open(path, "rb")
                    event = _read_event_at(handles[path], int(self._index.offsets[i]))
                    for value in event.summary.value if event is not None else ():
                        parsed = metadata.parse_block_tag(value.tag)
                        if parsed and parsed[0] == self.group and parsed[1] == metadata.ROWS:
                            array = _tensor(value, event.step, decoder.dropped)
                            if array is not None:
                                items.append((value.tag, event.step, event.wall_time, array))
                                groups.append(group_of[j])
                steps, stored, kept = decoder._decode(items)
                group_by_item = {id(item): g for item, g in zip(items, groups)}
                kept_groups = np.array([group_by_item[id(k)] for k in kept], dtype=np.int64)
                for g in np.unique(kept_groups):
                    mine = kept_groups == g
                    part_steps, part = steps[mine], stored[mine]
                    if g in folded:
                        part_steps = np.concatenate([[folded[g][0]], part_steps])
                        part = np.concatenate([folded[g][1][None], part])
                    last, one = timeline.fold(part_steps, part, len(part_steps))
                    folded[g] = (int(last[-1]), one[0])
        except OSError:
            pass  # a file gone since: the kept rows answer instead
        finally:
            for f in handles.values():
                f.close()
        if not folded:
            return np.zeros(0, np.int64), np.zeros((0, len(self.sites), len(stats.STATS)))
        order = sorted(folded)
        steps = np.array([folded[g][0] for g in order], np.int64)
        return steps, metadata.decode_rows(
            np.stack([folded[g][1] for g in order]), timeline.DISK, steps
        )


def _row_span(view):
    """The steps one logged row covers (the most a full-resolution row covers)."""
    head = view.line.head_rows
    if len(head):
        return int(timeline.covered_steps(head).max())
    return 1


def _read_event_at(f, offset):
    """The Event of the frame at `offset` of an open file, or None if it does not verify (the
    file changed since it was indexed)."""
    f.seek(offset)
    header = f.read(eventfile.HEADER_BYTES)
    if len(header) < eventfile.HEADER_BYTES:
        return None
    (length,) = struct.unpack_from("<Q", header)
    if length > os.fstat(f.fileno()).st_size - offset:  # never read past what the file holds
        return None
    frame = memoryview(header + f.read(length + eventfile.FOOTER_BYTES))
    status, end, _ = eventfile.frame_at(frame, 0)
    if status != eventfile.FRAME_OK:
        return None
    try:
        return event_pb2.Event.FromString(
            frame[eventfile.HEADER_BYTES : end - eventfile.FOOTER_BYTES]
        )
    except Exception:
        return None


def skipped_steps(skips):
    """Steps the LossScaleOptimizer skipped: the writer's running total (`skips_total`) when
    it says one (one event may stand for several steps: `check_every`, `steps_per_execution`),
    else one per event.  The one count, for the CLI and the tab alike."""
    if not skips:
        return 0
    totals = [int(e["skips_total"]) for e in skips if validation.is_step(e.get("skips_total"))]
    return max([len(skips)] + totals)


def producer_index(view, first):
    """Index into view.sites of the first non-finite record's site (its `site` field when
    it names the same layer/kind/tensor, else looked up by name), or None."""
    if not first:
        return None
    index = first.get("site")
    key = (first.get("layer"), first.get("kind"), first.get("tensor", "") or "")
    if isinstance(index, int) and 0 <= index < len(view.sites):
        s = view.sites[index]
        if (s["layer"], s["kind"], s.get("tensor", "")) == key:
            return index
    return view.site_index(*key)


def _first_from_rows(view):
    """Fallback when the record itself was lost (e.g. an old or truncated file): the
    earliest first_nonfinite_step over the timeline, in site (execution) order."""
    skipped = any(e.get("type") == LOSS_SCALE_SKIP for e in view.events)
    # Steps the LossScaleOptimizer skipped hold non-finite gradients by design: without
    # the record, a run with skips can only be judged by its other sites.
    eligible = np.array(
        [not (skipped and s["kind"] in stats.GRADIENT_KINDS) for s in view.sites], dtype=bool
    )
    if not len(view.timeline_steps) or not len(view.sites):
        return None
    first_col = view.timeline_rows[..., stats.STAT_INDEX["first_nonfinite_step"]]
    candidates = np.where(eligible[None, :] & ~np.isnan(first_col), first_col, np.inf)
    i, s = np.unravel_index(np.argmin(candidates), candidates.shape)
    if not np.isfinite(candidates[i, s]):
        return None
    site, row = view.sites[s], view.timeline_rows[i, s]
    return dict(
        step=int(candidates[i, s]),
        layer=site["layer"],
        kind=site["kind"],
        tensor=site.get("tensor", ""),
        nan=int(np.nan_to_num(row[stats.STAT_INDEX["nan"]])),
        posinf=int(np.nan_to_num(row[stats.STAT_INDEX["posinf"]])),
        neginf=int(np.nan_to_num(row[stats.STAT_INDEX["neginf"]])),
        source="rows",
    )


def session_words(session):
    """`steps 0-999, written 21:03:04-21:05:10 UTC on 2026-12-01`."""
    import time

    a, b = (time.gmtime(session[k]) for k in ("first_wall_time", "last_wall_time"))
    return "steps %d-%d, written %s-%s UTC on %s" % (
        session["first_step"],
        session["last_step"],
        time.strftime("%H:%M:%S", a),
        time.strftime("%H:%M:%S", b),
        time.strftime("%Y-%m-%d", a),
    )


# -- building views ---------------------------------------------------------------------------
class RunSource:
    """One run directory read incrementally: `view(group)` reads what was appended since
    the last call and returns the RunView of that version (the same object while nothing
    changed)."""

    def __init__(self, run, run_dir):
        self.run, self.run_dir = run, run_dir
        self.files = runfiles.RunFiles(run_dir)
        self._builders = {}  # group -> RunBuilder
        self._views = {}
        self._fingerprint = None
        self._lock = threading.Lock()

    def refresh(self):
        """Reads what is new; True if anything was."""
        fingerprint = self.files.fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        for path, offset, event in self.files.read_new():
            if not event.HasField("summary"):
                continue
            groups = {
                parsed[0]
                for parsed in (metadata.parse_block_tag(v.tag) for v in event.summary.value)
                if parsed is not None
            }
            for group in groups:  # each builder takes the values of its own group
                builder = self._builders.get(group)
                if builder is None:
                    builder = self._builders[group] = RunBuilder(self.run, group, self.run_dir)
                builder.add_event(event, path, offset)
        self._views = {}
        return True

    def groups(self):
        """The site lists with nanwatch data, the default one (None) first."""
        return sorted(self._builders, key=lambda g: (g is not None, g or ""))

    def view(self, group=None):
        with self._lock:  # requests come in threads; a file is read by one at a time
            return self._view(group)

    def _view(self, group):
        self.refresh()
        if group not in self._builders:
            raise RunNotFound(
                "no nanwatch data for run %r%s"
                % (self.run, "" if group is None else " group %r" % group)
            )
        if group not in self._views:
            self._views[group] = self._builders[group].view(self.files.damage())
        return self._views[group]


def from_files(run, run_dir, group=None):
    """The RunView of a run directory, read once."""
    return RunSource(run, run_dir).view(group)


def as_view(data):
    """`data` itself if it is a RunView, else the RunView of a `reader.RunData`."""
    return data if isinstance(data, RunView) else from_run_data(data)


def from_run_data(data):
    """The RunView of a `reader.RunData` (rows a data provider holds)."""
    builder = RunBuilder(getattr(data, "run", ""), getattr(data, "group", None))
    builder.add_run_data(data)
    return builder.view()


def edge_progress(run_dir, group=None):
    """stats.loss_progress of a run from the first and the last logged row of its row file
    only (a runs overview of many runs reads no more), or None."""
    edges = runfiles.edge_rows(run_dir, group)
    if edges is None:
        return None
    builder = RunBuilder("", group)
    for path, offset, event in edges:
        builder.add_event(event, path, offset)
    if builder._pending:
        builder._flush_rows()
    if builder.timeline is None:
        return None
    steps, rows = builder.timeline.rows()
    return stats.loss_progress(builder.sites, steps, rows)


def is_local_dir(path):
    return bool(path) and "://" not in str(path) and os.path.isdir(path)
