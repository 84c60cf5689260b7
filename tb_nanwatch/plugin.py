"""The NanWatch TensorBoard plugin: routes over a run's `runview.RunView` and `heatmap`.

Runs are listed through `context.data_provider`, so it works with RustBoard (the default
`--load_fast=true`) and with the Python multiplexer (`--load_fast=false`).  A run's rows
are read from its own files in the logdir (`runfiles`), incrementally, into a view of
bounded size, the way TensorBoard's profile plugin reads its own files: TensorBoard never
holds them.  A logdir that is not a local directory is read through the data provider
(all rows, as the provider keeps them).  Every route is documented in `http_api.md`
beside this file.  The frontend (`frontend/` in the
repository, package `tb_nanwatch.frontend`) is served by the plugin itself from an
allow-list of files.
"""

import base64
import collections
import importlib
import json
import logging
import math
import os
import time

import numpy as np
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util, json_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from tb_nanwatch import (
    cache,
    diagnosis,
    early_warning,
    failing_step,
    heatmap,
    metadata,
    reader,
    report,
    runfiles,
    runview,
    stats,
)

logger = logging.getLogger(__name__)

# Static files the frontend consists of, and their content types.  Nothing else is served.
STATIC_FILES = {
    "index.js": "text/javascript",
    "data.js": "text/javascript",
    "heatmap.js": "text/javascript",
    "controls.js": "text/javascript",
    "tree.js": "text/javascript",
    "table.js": "text/javascript",
    "diagnosis.js": "text/javascript",
    "location.js": "text/javascript",
    "style.css": "text/css",
}

# Limits of the heatmap route; bigger requests are refused (400), not clamped silently.
MAX_COLUMNS = 5000
DEFAULT_COLUMNS = 500
# Finite runs whose loss progress the overview remembers, and for how long a live run's
# answer stands before its rows are read again (a sweep of live runs is not re-read whole
# on every reload).
PROGRESS_MEMO_SIZE = 1024
PROGRESS_MAX_AGE_S = 60.0
# (experiment, run, group) entries kept by the RunData cache.
CACHE_SIZE = 16
# ... and at most this many bytes of rows (the most recent run is always kept).
CACHE_BYTES = 512 * 2**20
# /heatmap answers kept (keyed by the run data's version, so new data is never stale).
HEATMAP_CACHE_SIZE = 32
# Writer events listed per /heatmap answer; beyond this, one per (type, column).
MAX_EVENTS = 5000
# A step parameter must fit a signed 64-bit integer.
_MAX_STEP = 2**63 - 1


def frontend_dir():
    """The directory holding the frontend files: the package `tb_nanwatch.frontend` (a wheel,
    or the editable install's mapping onto the repository's `frontend/`), else the
    repository layout.  Resolved once, when the plugin loads."""
    candidates = []
    try:
        candidates.extend(str(p) for p in importlib.import_module("tb_nanwatch.frontend").__path__)
    except ImportError:
        pass
    candidates.append(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "frontend")
    )
    return next(
        (d for d in candidates if os.path.isfile(os.path.join(d, "index.js"))), candidates[-1]
    )


def _parse_samples_per_plugin(value):
    """`--samples_per_plugin` as TensorBoard parses it (`a=1,b=2` -> dict)."""
    result = {}
    for token in str(value).split(","):
        token = token.strip()
        if token:
            key, _, count = token.partition("=")
            result[key.strip()] = int(count)
    return result


class NanWatchLoader(base_plugin.TBLoader):
    """Registers the plugin under the `tensorboard_plugins` entry point."""

    def define_flags(self, parser):
        pass

    def fix_flags(self, flags):
        """Keep every nanwatch record: TensorBoard keeps only 10 (multiplexer) or 100
        (RustBoard) random samples per tag of a third-party plugin, which would drop
        rows.  0 means "all".  A value the user gave explicitly still wins.

        `samples_per_plugin` is a dict after argparse (its `type` parses the default
        too), but a string when set through `TensorBoard.configure(samples_per_plugin=...)`
        and may be missing or None on a hand-built namespace: handle them all.
        """
        value = getattr(flags, "samples_per_plugin", None)
        if value is None:
            value = {}
        elif isinstance(value, str):
            value = _parse_samples_per_plugin(value)
        elif not isinstance(value, dict):
            value = dict(value)
        value.setdefault(metadata.PLUGIN_NAME, 0)
        flags.samples_per_plugin = value

    def load(self, context):
        return NanWatchPlugin(context)


class _BadRequest(ValueError):
    pass


# What each error of a request means over HTTP, first match wins.  Anything else is the data
# provider failing (e.g. RustBoard down): 503, said in JSON.  TensorBoard's own errors
# (errors.PublicError) carry their status already and pass through.
ERROR_STATUS = (
    (_BadRequest, 400),  # a bad or missing parameter
    (heatmap.HeatmapError, 400),  # a request the data cannot answer
    (runview.RunNotFound, 404),
    (metadata.MetadataError, 422),  # written by a newer tb_nanwatch
    (reader.InvalidData, 422),  # damaged past the reader's gate
)


class NanWatchPlugin(base_plugin.TBPlugin):
    """Routes parse their parameters and hand them to a `*_impl` method, which takes plain
    values (a request context, an experiment id, names, numbers), so each is tested
    directly; `_json_route` turns their answers and errors (ERROR_STATUS) into HTTP."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context):
        self._provider = context.data_provider
        logdir = getattr(context, "logdir", None)
        # Runs are directories below a local logdir: their files are read directly.
        self._logdir = logdir if runview.is_local_dir(logdir) else None
        self.cache = cache.RunCache(CACHE_SIZE, CACHE_BYTES, HEATMAP_CACHE_SIZE)
        self._sources = cache.Sources(CACHE_SIZE)
        # (experiment, run, group) -> (fingerprint, time, stats.loss_progress) of a finite run,
        # so that the overview reads a finite run's rows once per change (at most once a
        # minute for a live run), not once per request.
        self._progress = collections.OrderedDict()
        self._frontend_dir = frontend_dir()

    # -- TBPlugin ----------------------------------------------------------------
    def get_plugin_apps(self):
        apps = {
            "/info": self._serve_info,
            "/runs": self._serve_runs,
            "/groups": self._serve_groups,
            "/overview": self._serve_overview,
            "/first_nonfinite": self._serve_first_nonfinite,
            "/precursors": self._serve_precursors,
            "/diagnosis": self._serve_diagnosis,
            "/heatmap": self._serve_heatmap,
            "/cell": self._serve_cell,
        }
        for name in STATIC_FILES:
            apps["/" + name] = self._serve_static
        return apps

    def is_active(self):
        # Activity comes from data_plugin_names() via the data provider's list_plugins.
        return False

    def data_plugin_names(self):
        return (metadata.PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="NanWatch")

    # -- plumbing ----------------------------------------------------------------
    def _entry(self, ctx, eid, run, group=None):
        """The cache entry of (run, group), the group defaulting to the run's first site
        list, holding the run's view at its current version: a run that grew is read from
        where the last read stopped."""
        if group is None:
            groups = reader.list_runs(self._provider, ctx, eid).get(run)
            if groups is None:
                raise runview.RunNotFound("no nanwatch data for run %r" % run)
            group = groups[0]
        run_dir = self._run_dir(run)
        if run_dir is not None:
            source = self._sources.get(run_dir, lambda: runview.RunSource(run, run_dir))
            view = source.view(group)
            return self.cache.get((eid, run, group), id(view), lambda: view)
        series = reader.run_series(self._provider, ctx, eid, run, group)
        if not series:  # a run killed before its first row still has its first-non-finite record
            raise runview.RunNotFound(
                "no nanwatch data for run %r%s"
                % (run, "" if group is None else " group %r" % group)
            )
        fingerprint = tuple(
            sorted((tag, ts.max_step, ts.max_wall_time) for tag, ts in series.items())
        )
        return self.cache.get(
            (eid, run, group),
            fingerprint,
            lambda: runview.from_run_data(reader.read_run(self._provider, ctx, eid, run, group)),
        )

    def _run_dir(self, run):
        """The directory of `run` below the local logdir, or None (not local, or a run name
        that does not name a directory inside it)."""
        if self._logdir is None or not isinstance(run, str):
            return None
        root = os.path.realpath(self._logdir)
        path = os.path.realpath(os.path.join(root, run))
        if path != root and not path.startswith(root + os.sep):
            return None
        return path if os.path.isdir(path) else None

    def _json_route(self, request, impl):
        """impl(ctx, experiment_id) as a JSON answer; its errors by ERROR_STATUS, never an
        HTML 500 for anything the request or the logs could cause."""
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        try:
            body = impl(ctx, eid)
        except errors.PublicError:
            raise
        except Exception as e:
            code = next((c for kind, c in ERROR_STATUS if isinstance(e, kind)), None)
            if code is None:
                logger.exception("nanwatch: %s failed", request.path)
                code, e = 503, "reading the logs failed: %s: %s" % (type(e).__name__, e)
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=code)
        if not isinstance(body, (dict, list)):  # Respond serialises only dicts and lists
            body = json.dumps(json_util.Cleanse(body))
        return http_util.Respond(request, body, "application/json")

    # -- routes: parse, then delegate ---------------------------------------------
    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/", 1)[-1]
        if name not in STATIC_FILES:  # unreachable through routing; kept as a guard
            return http_util.Respond(request, "not found", "text/plain", code=404)
        path = os.path.join(self._frontend_dir, name)
        if not os.path.isfile(path):
            return http_util.Respond(
                request,
                "frontend file %s is missing from the installation" % name,
                "text/plain",
                code=404,
            )
        with open(path, "rb") as f:
            return http_util.Respond(request, f.read(), STATIC_FILES[name])

    @wrappers.Request.application
    def _serve_info(self, request):
        return http_util.Respond(request, self.info_impl(), "application/json")

    @wrappers.Request.application
    def _serve_runs(self, request):
        return self._json_route(request, self.runs_impl)

    @wrappers.Request.application
    def _serve_groups(self, request):
        return self._json_route(request, self.groups_impl)

    @wrappers.Request.application
    def _serve_overview(self, request):
        return self._json_route(request, self.overview_impl)

    @wrappers.Request.application
    def _serve_first_nonfinite(self, request):
        run, group = _required_later(request, "run"), request.args.get("group") or None
        return self._json_route(
            request, lambda ctx, eid: self.first_nonfinite_impl(ctx, eid, run(), group)
        )

    @wrappers.Request.application
    def _serve_precursors(self, request):
        run, group = _required_later(request, "run"), request.args.get("group") or None
        return self._json_route(
            request, lambda ctx, eid: self.precursors_impl(ctx, eid, run(), group)
        )

    @wrappers.Request.application
    def _serve_diagnosis(self, request):
        run, group = _required_later(request, "run"), request.args.get("group") or None
        return self._json_route(
            request, lambda ctx, eid: self.diagnosis_impl(ctx, eid, run(), group)
        )

    @wrappers.Request.application
    def _serve_heatmap(self, request):
        def impl(ctx, eid):
            return self.heatmap_impl(
                ctx,
                eid,
                _required(request, "run"),
                request.args.get("group") or None,
                stat=request.args.get("stat", stats.DEFAULT_STAT),
                kind=request.args.get("kind", "all"),
                columns=_int_arg(request, "columns", DEFAULT_COLUMNS, 1, MAX_COLUMNS),
                first_step=_int_arg(request, "first_step", None, 0, _MAX_STEP),
                last_step=_int_arg(request, "last_step", None, 0, _MAX_STEP),
                source=request.args.get("source", "rows"),
                rows=request.args.get("rows", "tree"),
            )

        return self._json_route(request, impl)

    @wrappers.Request.application
    def _serve_cell(self, request):
        def impl(ctx, eid):
            site = _int_arg(request, "site", None, 0, 2**31 - 1)
            if site is None:
                raise _BadRequest("missing parameter 'site' (index into the run's site list)")
            return self.cell_impl(
                ctx,
                eid,
                _required(request, "run"),
                site,
                request.args.get("group") or None,
                first_step=_int_arg(request, "first_step", None, 0, _MAX_STEP),
                last_step=_int_arg(request, "last_step", None, 0, _MAX_STEP),
                source=request.args.get("source", "rows"),
            )

        return self._json_route(request, impl)

    # -- what the routes answer ----------------------------------------------------
    def info_impl(self):
        info = stats.table_as_json()
        info["version"] = metadata.PROTOCOL_VERSION
        info["max_columns"] = MAX_COLUMNS
        return info

    def runs_impl(self, ctx, eid):
        return list(reader.list_runs(self._provider, ctx, eid))

    def groups_impl(self, ctx, eid):
        return reader.list_runs(self._provider, ctx, eid)

    def first_nonfinite_impl(self, ctx, eid, run, group=None):
        return self._entry(ctx, eid, run, group).data.first

    def precursors_impl(self, ctx, eid, run, group=None):
        """`diagnosis.precursors` of the run, computed once per version of its data."""
        entry = self._entry(ctx, eid, run, group)
        return entry.memo("precursors", lambda: diagnosis.precursors(entry.data))

    def diagnosis_impl(self, ctx, eid, run, group=None):
        """The causes and the early warning of the run, and what its directory keeps about the
        failing step (bundle, ops, replay), read anew: the causes are computed once per version
        of the run's data and of its replay (a replay reorders them)."""
        entry = self._entry(ctx, eid, run, group)
        view = entry.data
        facts = failing_step.facts(view.run_dir, view.first.get("layer") if view.first else None)
        replay = (facts or {}).get("replay")
        answer = entry.memo(
            ("diagnosis", json.dumps(replay, sort_keys=True, default=str)),
            lambda: report.jsonable(
                {
                    "diagnosis": diagnosis.diagnose(view, replay=replay),
                    "early_warning": early_warning.as_json(early_warning.from_run(view)),
                }
            ),
        )
        return dict(answer, failing_step=report.jsonable(facts))

    def overview_impl(self, ctx, eid):
        """Every run's state in one list: its first non-finite step and site, or finite (with
        its loss-scale skips).  Cheap on a logdir of many runs: runs already read answer from
        their view; the others from their small first-non-finite and events records and the
        last record of their row file."""
        listing = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME
        )
        out = []
        for run, groups in reader.list_runs(self._provider, ctx, eid).items():
            for group in groups:
                series = {
                    t: ts
                    for t, ts in listing.get(run, {}).items()
                    if (metadata.parse_tag(t) or (False,))[0] == group
                }
                run_dir = self._run_dir(run)
                source = self._sources.peek(run_dir) if run_dir is not None else None
                try:
                    if source is not None:  # read already: brought up to date, cheaply
                        data = source.view(group)
                    else:
                        data = reader.read_run_summary(self._provider, ctx, eid, run, group, series)
                        if run_dir is not None:  # rows in the run's row file: its last one
                            last = runfiles.last_row_step(run_dir, group)
                            if last is not None:
                                data.last_step = max(last, data.last_step or 0)
                except (runview.RunNotFound, reader.InvalidData, metadata.MetadataError) as e:
                    out.append({"run": run, "group": group, "state": "unreadable", "error": str(e)})
                    continue
                progress = None
                if source is None and reader.first_nonfinite_json(data) is None:
                    progress = self._loss_progress(ctx, eid, run, group, run_dir, series)
                out.append(run_state(data, progress))
        return out

    def _loss_progress(self, ctx, eid, run, group, run_dir, series):
        """stats.loss_progress of a finite run not read yet (a finite run is "healthy" only
        if its loss went down): from the first and last rows of its row file, else (a logdir
        that is not local) its rows through the provider, once per change, at most once a
        minute for a live run."""
        key = (eid, run, group)
        if run_dir is not None:
            fingerprint = runfiles.RunFiles(run_dir).fingerprint()
        else:
            fingerprint = tuple(
                sorted((t, ts.max_step, ts.max_wall_time) for t, ts in series.items())
            )
        known = self._progress.get(key)
        now = time.monotonic()
        if known is None or (known[0] != fingerprint and now - known[1] > PROGRESS_MAX_AGE_S):
            try:
                if run_dir is not None:
                    progress = runview.edge_progress(run_dir, group)
                else:
                    full = reader.read_run(self._provider, ctx, eid, run, group)
                    progress = stats.loss_progress(full.sites, full.steps, full.rows)
            except (runview.RunNotFound, reader.InvalidData, metadata.MetadataError):
                progress = None
            known = self._progress[key] = (fingerprint, now, progress)
            while len(self._progress) > PROGRESS_MEMO_SIZE:
                self._progress.popitem(last=False)
        return known[2]

    def heatmap_impl(
        self,
        ctx,
        eid,
        run,
        group=None,
        stat=stats.DEFAULT_STAT,
        kind="all",
        columns=DEFAULT_COLUMNS,
        first_step=None,
        last_step=None,
        source="rows",
        rows="tree",
    ):
        if rows not in heatmap.ROW_MODES:
            raise _BadRequest("unknown rows %r; one of: %s" % (rows, ", ".join(heatmap.ROW_MODES)))
        if not 1 <= columns <= MAX_COLUMNS:
            raise _BadRequest(
                "parameter 'columns' must be between 1 and %d, got %d" % (MAX_COLUMNS, columns)
            )
        _check_range(first_step, last_step)
        if stat not in stats.STAT_INDEX:
            raise _BadRequest("unknown stat %r; one of: %s" % (stat, ", ".join(stats.STAT_NAMES)))
        if kind != "all" and kind not in stats.KINDS:
            raise _BadRequest(
                "unknown kind %r; 'all' or one of: %s" % (kind, ", ".join(stats.KINDS))
            )
        _check_source(source)
        entry = self._entry(ctx, eid, run, group)
        # A reload of an unchanged run (the frontend re-asks every 30 s) costs nothing.
        args = (stat, kind, columns, first_step, last_step, source, rows)
        return entry.memo(("heatmap",) + args, lambda: heatmap_body(entry.data, *args))

    def cell_impl(
        self, ctx, eid, run, site, group=None, first_step=None, last_step=None, source="rows"
    ):
        _check_source(source)
        _check_range(first_step, last_step)
        data = self._entry(ctx, eid, run, group).data
        if not 0 <= site < len(data.sites):
            raise _BadRequest(
                "site %d out of range: run %r has %d sites" % (site, run, len(data.sites))
            )
        return cell_body(data, site, first_step, last_step, source)


def heatmap_body(data, stat, kind, columns, first_step, last_step, source, rows_mode="tree"):
    """The /heatmap answer over one version of a run's view (see http_api.md)."""
    first = data.first
    hm = heatmap.build(
        data,
        stat=stat,
        kind=None if kind == "all" else kind,
        max_columns=columns,
        first_step=first_step,
        last_step=last_step,
        source=source,
        rows_mode=rows_mode,
        first_step_of_run=None if first is None else int(first["step"]),
    )
    tree_rows = None if hm.tree is None else [n.as_json() for n in hm.tree.nodes]
    return {
        "run": data.run,
        "group": data.group,
        "stat": stat,
        "kind": kind,
        "source": source,
        "rows_mode": rows_mode,
        "n_sites": len(hm.site_indices),
        "n_rows": int(hm.values.shape[0]),
        "n_columns": int(len(hm.first_steps)),
        "sites": [dict(_site_json(data.sites[i]), index=int(i)) for i in hm.site_indices],
        # rows "tree": groups > layers > sites in pre-order; "sites": null (rows are `sites`).
        "rows": tree_rows,
        "first_steps": [int(s) for s in hm.first_steps],
        "last_steps": [int(s) for s in hm.last_steps],
        "rows_per_column": [int(n) for n in hm.rows_per_column],
        # Logged rows ending in this view's steps (a long run's view folds some of them).
        "logged_rows": data.logged_rows_in(first_step, last_step)
        if source == "rows"
        else int(sum(hm.rows_per_column)),
        # Row-major [n_rows, n_columns]; NaN = not measured.
        "values": _b64(hm.values.astype("<f4")),
        "status": _b64(hm.status.astype(np.uint8)),
        # 1 where a non-finite cell of the first non-finite step's column went bad later.
        "late": _b64(hm.late.astype(np.uint8)),
        "first_nonfinite_cell": _first_cell(data, hm, first),
        "step_range": _step_range(data.timeline_steps, data.timeline_rows, data.n_logged_rows),
        "flight_range": _step_range(data.flight_steps, data.flight_rows),
        "events": _events_in_view(data.events, hm),
        "event_counts": _event_counts(data.events),
        "warnings": data.warnings + data.damage,  # records dropped by the gate; damaged files
        # Several writer sessions in the run directory: the words naming them (the data
        # is the latest one's), else null.
        "session_warning": data.session_warning(),
    }


def cell_body(data, site, first_step, last_step, source):
    """The /cell answer: every statistic of one site over the rows overlapping the range."""
    steps, rows = (
        data.rows_in(first_step, last_step)
        if source == "rows"
        else (data.flight_steps, data.flight_rows)
    )
    steps, firsts, picked = heatmap.select_rows(
        steps, rows[:, site : site + 1, :] if len(steps) else rows, first_step, last_step
    )
    picked = picked[:, 0, :] if len(picked) else picked.reshape(0, len(stats.STATS))
    if len(picked):
        combined = stats.aggregate_rows(picked, axis=0) if len(picked) > 1 else picked[0]
        status = stats.STATUS_NAMES[int(stats.nonfinite_status(combined))]
        values = {name: _num(combined[k]) for k, name in enumerate(stats.STAT_NAMES)}
        covered = [int(firsts[0]), int(steps[-1])]
    else:
        status, values, covered = None, None, None
    flight = [
        dict(
            {"step": int(s)}, **{name: _num(r[site, k]) for k, name in enumerate(stats.STAT_NAMES)}
        )
        for s, r in zip(data.flight_steps, data.flight_rows)
    ]
    return {
        "run": data.run,
        "group": data.group,
        "source": source,
        "site": dict(_site_json(data.sites[site]), index=site),
        "rows": int(len(picked)),
        "steps": covered,
        "status": status,
        "stats": values,
        "flight": flight,
    }


def run_state(data, progress=None):
    """A run's line of the runs overview: "nonfinite" (its first step and site), "skips"
    (finite but for loss-scale skips, by design), "healthy" (finite and the loss went down:
    `progress`, stats.loss_progress, the view's own when not given) or "no_progress"
    (finite, no sign of training)."""
    view = runview.as_view(data)
    first = view.first
    last = view.last_step
    if last is None:
        last = getattr(data, "last_step", None)
    out = {
        "run": view.run,
        "group": view.group,
        "last_step": last,
        "loss_scale_skips": view.skipped_steps,
        "session_warning": view.session_warning(),
    }
    if first is not None:
        out.update(
            state="nonfinite",
            step=int(first["step"]),
            layer=first["layer"],
            kind=first["kind"],
            tensor=first.get("tensor", ""),
            nan=first.get("nan", 0),
            posinf=first.get("posinf", 0),
            neginf=first.get("neginf", 0),
        )
    else:
        if progress is None:
            progress = view.loss_progress
        made_progress = bool(progress and progress["progress"])
        out["state"] = (
            "skips" if view.skipped_steps else ("healthy" if made_progress else "no_progress")
        )
        out["loss_progress"] = progress
    return out


# -- helpers ---------------------------------------------------------------------
def _required(request, name):
    value = request.args.get(name)
    if value is None or value == "":
        raise _BadRequest("missing parameter %r" % name)
    return value


def _required_later(request, name):
    """The parameter, read inside the route's error handling (a missing one answers 400)."""
    return lambda: _required(request, name)


def _check_range(first_step, last_step):
    if first_step is not None and last_step is not None and first_step > last_step:
        raise _BadRequest("first_step %d is after last_step %d" % (first_step, last_step))


def _check_source(source):
    if source not in heatmap.SOURCES:
        raise _BadRequest("unknown source %r; one of: %s" % (source, ", ".join(heatmap.SOURCES)))


def _int_arg(request, name, default, lo, hi):
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest("parameter %r must be an integer, got %r" % (name, raw))
    if not lo <= value <= hi:
        raise _BadRequest("parameter %r must be between %d and %d, got %d" % (name, lo, hi, value))
    return value


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _num(x):
    """A float for JSON: None for NaN (not measured); +-Infinity as strings (by Respond)."""
    x = float(x)
    return None if math.isnan(x) else x


def _site_json(site):
    from tb_nanwatch.summary import site_label

    return {
        "layer": site.get("layer", ""),
        "kind": site.get("kind", ""),
        "tensor": site.get("tensor", ""),
        "dtype": site.get("dtype", ""),
        "shape": list(site.get("shape", [])),
        "label": site_label(site),
    }


def _step_range(steps, rows, n_rows=None):
    """First and last step of `steps`, and the rows they came from (`n_rows`, the logged
    rows a view folded, else len(steps))."""
    if not len(steps):
        return None
    firsts = heatmap.row_first_steps(steps, rows)
    count = len(steps) if n_rows is None else n_rows
    return {"first": int(firsts.min()), "last": int(steps.max()), "rows": int(count)}


def _first_cell(data, hm, first):
    """(row, column) of the heatmap cell holding the first non-finite value, or None when
    it is outside this heatmap (another kind, another step range, or none at all).  In
    the tree, `row` is the producer's site row and `path` its ancestors, outermost first."""
    if not first:
        return None
    site = data.producer
    if site is None or site not in hm.site_indices:
        return None
    step = int(first["step"])
    col = int(heatmap.columns_of(hm, [step])[0])
    if col < 0:
        return None
    if hm.tree is None:
        return {"row": hm.site_indices.index(site), "column": col, "site": int(site), "step": step}
    row = next(r for r, n in enumerate(hm.tree.nodes) if n.site == site)
    path = []
    parent = hm.tree.nodes[row].parent
    while parent is not None:
        path.insert(0, parent)
        parent = hm.tree.nodes[parent].parent
    return {"row": row, "column": col, "site": int(site), "step": step, "path": path}


def _is_step(x):
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(x)
    )


def _events_in_view(events, hm):
    """The writer's events (loss-scale skips, a collapsed loss scale...) at the steps this
    heatmap spans, step ascending, each with the column holding its step (None: a gap
    between logged rows).  Past MAX_EVENTS, the last event of each type in each column
    stands for the others and says how many in `merged`."""
    if not len(hm.first_steps):
        return []
    lo, hi = int(hm.first_steps.min()), int(hm.last_steps.max())
    placed = [
        e
        for e in events
        if isinstance(e, dict) and _is_step(e.get("step")) and lo <= e["step"] <= hi
    ]
    placed.sort(key=lambda e: e["step"])
    cols = heatmap.columns_of(hm, [int(e["step"]) for e in placed])
    out = [
        dict(
            e,
            type=str(e.get("type", "event")),
            step=int(e["step"]),
            column=None if c < 0 else int(c),
        )
        for e, c in zip(placed, cols)
    ]
    if len(out) > MAX_EVENTS:
        last = collections.OrderedDict()
        for e in out:
            key = (e["type"], e["column"] if e["column"] is not None else ("step", e["step"]))
            merged = last.pop(key, {}).get("merged", 0) + 1
            last[key] = dict(e, merged=merged)
        out = sorted(last.values(), key=lambda e: e["step"])
    return out


def _event_counts(events):
    """Per event type over the whole run: how many (for loss-scale skips, the skipped
    steps, from the writer's running total), their steps, and the latest one (e.g. the
    loss scale after the last skip)."""
    by_type = {}
    for e in events:
        by_type.setdefault(
            str(e.get("type", "event")) if isinstance(e, dict) else "event", []
        ).append(e)
    out = []
    for kind, found in sorted(by_type.items()):
        dicts = [e for e in found if isinstance(e, dict)]
        steps = [int(e["step"]) for e in dicts if _is_step(e.get("step"))]
        count = len(found)
        totals = [e["skips_total"] for e in dicts if _is_step(e.get("skips_total"))]
        if kind == "loss_scale_skip" and totals:
            count = max(count, int(max(totals)))
        out.append(
            {
                "type": kind,
                "count": count,
                "records": len(found),
                "first_step": min(steps) if steps else None,
                "last_step": max(steps) if steps else None,
                "last": dicts[-1] if dicts else None,
            }
        )
    return out
