"""The NanWatch TensorBoard plugin: routes over `tb_nanwatch.reader` and `tb_nanwatch.heatmap`.

Reads only through `context.data_provider`, so it works with RustBoard (the default
`--load_fast=true`) and with the Python multiplexer (`--load_fast=false`).  Every route
is documented in `http_api.md` beside this file.  The frontend (`frontend/` in the
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
import threading

import numpy as np
from werkzeug import wrappers

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util, json_util
from tensorboard.data import provider as tb_provider
from tensorboard.plugins import base_plugin

from tb_nanwatch import diagnosis, early_warning, heatmap, metadata, reader, report, stats

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


def _frontend_dirs():
    """Directories holding the frontend files: the package `tb_nanwatch.frontend` (a wheel,
    or the editable install's mapping onto the repository's `frontend/`), then the
    repository layout as a fallback."""
    dirs = []
    try:
        dirs.extend(str(p) for p in importlib.import_module("tb_nanwatch.frontend").__path__)
    except ImportError:
        pass
    dirs.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "frontend"))
    return dirs


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


class NanWatchPlugin(base_plugin.TBPlugin):
    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context):
        self._provider = context.data_provider
        self._cache = collections.OrderedDict()      # (eid, run, group) -> (fingerprint, RunData)
        self._heatmaps = collections.OrderedDict()   # (data version, request) -> /heatmap body
        self._lock = threading.Lock()

    # -- TBPlugin ----------------------------------------------------------------
    def get_plugin_apps(self):
        apps = {
            "/info": self._serve_info,
            "/runs": self._serve_runs,
            "/groups": self._serve_groups,
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
    def _ctx(self, request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _run_data(self, request, run, group):
        """RunData of (run, group), cached while the provider reports nothing new for it."""
        ctx, eid = self._ctx(request)
        series = reader.run_series(self._provider, ctx, eid, run, group)
        if not series:   # a run killed before its first row still has its first-non-finite record
            raise reader.RunNotFound("no nanwatch data for run %r%s" % (
                run, "" if group is None else " group %r" % group))
        fingerprint = tuple(sorted(
            (tag, ts.max_step, ts.max_wall_time) for tag, ts in series.items()))
        key = (eid, run, group)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == fingerprint:
                self._cache.move_to_end(key)
                return hit[1]
        data = reader.read_run(self._provider, ctx, eid, run, group)
        data.fingerprint = (key, fingerprint)
        with self._lock:
            self._cache[key] = (fingerprint, data)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE or (
                    len(self._cache) > 1 and sum(_nbytes(d) for _, d in self._cache.values()) > CACHE_BYTES):
                self._cache.popitem(last=False)
        return data

    def _cached_heatmap(self, data, *args):
        """The /heatmap answer for these arguments over this version of the run's data:
        a reload of an unchanged run (the frontend re-asks every 30 s) costs nothing."""
        key = (data.fingerprint,) + args
        with self._lock:
            hit = self._heatmaps.get(key)
            if hit is not None:
                self._heatmaps.move_to_end(key)
                return hit
        body = self._heatmap_body(data, *args)
        with self._lock:
            self._heatmaps[key] = body
            while len(self._heatmaps) > HEATMAP_CACHE_SIZE:
                self._heatmaps.popitem(last=False)
        return body

    def _groups(self, request):
        ctx, eid = self._ctx(request)
        return reader.list_runs(self._provider, ctx, eid)

    def _run_and_group(self, request):
        """(run, group) from the query; the group defaults to the run's first site list."""
        run = _required(request, "run")
        group = request.args.get("group") or None
        if group is None:
            groups = self._groups(request).get(run)
            if groups is None:
                raise reader.RunNotFound("no nanwatch data for run %r" % run)
            group = groups[0]
        return run, group

    def _handle(self, request, fn):
        """Runs a JSON route: 400 for bad parameters, 404 for unknown runs, never a 500
        for anything the request itself could cause."""
        try:
            body = fn(request)
            if not isinstance(body, (dict, list)):  # Respond serialises only dicts and lists
                body = json.dumps(json_util.Cleanse(body))
            return http_util.Respond(request, body, "application/json")
        except _BadRequest as e:
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=400)
        except heatmap.HeatmapError as e:
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=400)
        except reader.RunNotFound as e:
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=404)
        except (metadata.MetadataError, reader.InvalidData) as e:
            # The logs are there but cannot be read (written by a newer tb_nanwatch, or
            # damaged past the reader's gate): the request was fine, the data is not.
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=422)
        except errors.PublicError:
            raise   # TensorBoard's own errors carry their HTTP status already
        except Exception as e:  # the data provider failed (e.g. RustBoard down): say so in JSON
            logger.exception("nanwatch: %s failed", request.path)
            return http_util.Respond(request, {"error": "reading the logs failed: %s: %s"
                                               % (type(e).__name__, e)}, "application/json", code=503)

    # -- routes ------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/", 1)[-1]
        if name not in STATIC_FILES:  # unreachable through routing; kept as a guard
            return http_util.Respond(request, "not found", "text/plain", code=404)
        for directory in _frontend_dirs():
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    content = f.read()
                return http_util.Respond(request, content, STATIC_FILES[name])
        return http_util.Respond(request, "frontend file %s is missing from the installation" % name,
                                 "text/plain", code=404)

    @wrappers.Request.application
    def _serve_info(self, request):
        info = stats.table_as_json()
        info["version"] = metadata.PROTOCOL_VERSION
        info["max_columns"] = MAX_COLUMNS
        return http_util.Respond(request, info, "application/json")

    @wrappers.Request.application
    def _serve_runs(self, request):
        return self._handle(request, lambda r: list(self._groups(r)))

    @wrappers.Request.application
    def _serve_groups(self, request):
        return self._handle(request, self._groups)

    @wrappers.Request.application
    def _serve_first_nonfinite(self, request):
        def route(request):
            run, group = self._run_and_group(request)
            return reader.first_nonfinite_json(self._run_data(request, run, group))
        return self._handle(request, route)

    @wrappers.Request.application
    def _serve_precursors(self, request):
        def route(request):
            run, group = self._run_and_group(request)
            return _precursors(self._run_data(request, run, group))
        return self._handle(request, route)

    @wrappers.Request.application
    def _serve_diagnosis(self, request):
        def route(request):
            run, group = self._run_and_group(request)
            return _diagnosis(self._run_data(request, run, group))
        return self._handle(request, route)

    @wrappers.Request.application
    def _serve_heatmap(self, request):
        return self._handle(request, self._heatmap)

    @wrappers.Request.application
    def _serve_cell(self, request):
        return self._handle(request, self._cell)

    # -- route bodies ------------------------------------------------------------
    def _heatmap(self, request):
        stat = request.args.get("stat", "max_abs")
        kind = request.args.get("kind", "all")
        source = request.args.get("source", "rows")
        rows_mode = request.args.get("rows", "tree")
        if rows_mode not in heatmap.ROW_MODES:
            raise _BadRequest("unknown rows %r; one of: %s" % (rows_mode, ", ".join(heatmap.ROW_MODES)))
        columns = _int_arg(request, "columns", DEFAULT_COLUMNS, 1, MAX_COLUMNS)
        first_step = _int_arg(request, "first_step", None, 0, _MAX_STEP)
        last_step = _int_arg(request, "last_step", None, 0, _MAX_STEP)
        if first_step is not None and last_step is not None and first_step > last_step:
            raise _BadRequest("first_step %d is after last_step %d" % (first_step, last_step))
        if stat not in stats.STAT_INDEX:
            raise _BadRequest("unknown stat %r; one of: %s" % (stat, ", ".join(stats.STAT_NAMES)))
        if kind != "all" and kind not in stats.KINDS:
            raise _BadRequest("unknown kind %r; 'all' or one of: %s" % (kind, ", ".join(stats.KINDS)))
        if source not in heatmap.SOURCES:
            raise _BadRequest("unknown source %r; one of: %s" % (source, ", ".join(heatmap.SOURCES)))
        run, group = self._run_and_group(request)
        data = self._run_data(request, run, group)
        return self._cached_heatmap(data, stat, kind, columns, first_step, last_step, source, rows_mode)

    def _heatmap_body(self, data, stat, kind, columns, first_step, last_step, source, rows_mode="tree"):
        run, group = data.run, data.group
        first = reader.first_nonfinite_json(data)
        hm = heatmap.build(data, stat=stat, kind=None if kind == "all" else kind, max_columns=columns,
                           first_step=first_step, last_step=last_step, source=source, rows_mode=rows_mode,
                           first_step_of_run=None if first is None else int(first["step"]))
        tree_rows = None if hm.tree is None else [n.as_json() for n in hm.tree.nodes]
        return {
            "run": run,
            "group": group,
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
            # Row-major [n_rows, n_columns]; NaN = not measured.
            "values": _b64(hm.values.astype("<f4")),
            "status": _b64(hm.status.astype(np.uint8)),
            # 1 where a non-finite cell of the first non-finite step's column went bad later.
            "late": _b64(hm.late.astype(np.uint8)),
            "first_nonfinite_cell": _first_cell(data, hm, first),
            "step_range": _step_range(data.steps, data.rows),
            "flight_range": _step_range(data.flight_steps, data.flight_rows),
            "events": _events_in_view(data.events, hm),
            "event_counts": _event_counts(data.events),
            "warnings": data.warnings,   # records the reader's gate dropped, per tag
            # Several writer sessions in the run directory: the words naming them (the data
            # is the latest one's), else null.
            "session_warning": data.session_warning(),
        }

    def _cell(self, request):
        source = request.args.get("source", "rows")
        if source not in heatmap.SOURCES:
            raise _BadRequest("unknown source %r; one of: %s" % (source, ", ".join(heatmap.SOURCES)))
        site = _int_arg(request, "site", None, 0, 2**31 - 1)
        if site is None:
            raise _BadRequest("missing parameter 'site' (index into the run's site list)")
        first_step = _int_arg(request, "first_step", None, 0, _MAX_STEP)
        last_step = _int_arg(request, "last_step", None, 0, _MAX_STEP)
        if first_step is not None and last_step is not None and first_step > last_step:
            raise _BadRequest("first_step %d is after last_step %d" % (first_step, last_step))
        run, group = self._run_and_group(request)
        data = self._run_data(request, run, group)
        if site >= len(data.sites):
            raise _BadRequest("site %d out of range: run %r has %d sites" % (site, run, len(data.sites)))
        steps, rows = (data.steps, data.rows) if source == "rows" else (data.flight_steps, data.flight_rows)
        firsts = heatmap.row_first_steps(steps, rows) if len(steps) else steps
        keep = np.ones(len(steps), dtype=bool)
        if first_step is not None:
            keep &= steps >= first_step
        if last_step is not None:
            keep &= firsts <= last_step
        picked = rows[:, site, :][keep]   # a view of one site, then the rows: no copy of the run
        if len(picked):
            combined = stats.aggregate_rows(picked, axis=0) if len(picked) > 1 else picked[0]
            status = stats.STATUS_NAMES[int(stats.nonfinite_status(combined))]
            values = {name: _num(combined[k]) for k, name in enumerate(stats.STAT_NAMES)}
            covered = [int(firsts[keep][0]), int(steps[keep][-1])]
        else:
            status, values, covered = None, None, None
        flight = [dict({"step": int(s)}, **{name: _num(r[site, k]) for k, name in enumerate(stats.STAT_NAMES)})
                  for s, r in zip(data.flight_steps, data.flight_rows)]
        return {
            "run": run,
            "group": group,
            "source": source,
            "site": dict(_site_json(data.sites[site]), index=site),
            "rows": int(keep.sum()),
            "steps": covered,
            "status": status,
            "stats": values,
            "flight": flight,
        }


# -- helpers ---------------------------------------------------------------------
def _required(request, name):
    value = request.args.get(name)
    if value is None or value == "":
        raise _BadRequest("missing parameter %r" % name)
    return value


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


def _nbytes(data):
    return data.rows.nbytes + data.flight_rows.nbytes


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _num(x):
    """A float for JSON: None for NaN (not measured); +-Infinity as strings (by Respond)."""
    x = float(x)
    return None if math.isnan(x) else x


def _site_json(site):
    from tb_nanwatch.summary import site_label
    return {"layer": site.get("layer", ""), "kind": site.get("kind", ""), "tensor": site.get("tensor", ""),
            "dtype": site.get("dtype", ""), "shape": list(site.get("shape", [])), "label": site_label(site)}


def _step_range(steps, rows):
    if not len(steps):
        return None
    firsts = heatmap.row_first_steps(steps, rows)
    return {"first": int(firsts.min()), "last": int(steps.max()), "rows": int(len(steps))}


def _first_cell(data, hm, first):
    """(row, column) of the heatmap cell holding the first non-finite value, or None when
    it is outside this heatmap (another kind, another step range, or none at all).  In
    the tree, `row` is the producer's site row and `path` its ancestors, outermost first."""
    if not first:
        return None
    site = reader.producer_index(data, first)
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
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _events_in_view(events, hm):
    """The writer's events (loss-scale skips, a collapsed loss scale...) at the steps this
    heatmap spans, step ascending, each with the column holding its step (None: a gap
    between logged rows).  Past MAX_EVENTS, the last event of each type in each column
    stands for the others and says how many in `merged`."""
    if not len(hm.first_steps):
        return []
    lo, hi = int(hm.first_steps.min()), int(hm.last_steps.max())
    placed = [e for e in events if isinstance(e, dict) and _is_step(e.get("step")) and lo <= e["step"] <= hi]
    placed.sort(key=lambda e: e["step"])
    cols = heatmap.columns_of(hm, [int(e["step"]) for e in placed])
    out = [dict(e, type=str(e.get("type", "event")), step=int(e["step"]), column=None if c < 0 else int(c))
           for e, c in zip(placed, cols)]
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
        by_type.setdefault(str(e.get("type", "event")) if isinstance(e, dict) else "event", []).append(e)
    out = []
    for kind, found in sorted(by_type.items()):
        dicts = [e for e in found if isinstance(e, dict)]
        steps = [int(e["step"]) for e in dicts if _is_step(e.get("step"))]
        count = len(found)
        totals = [e["skips_total"] for e in dicts if _is_step(e.get("skips_total"))]
        if kind == "loss_scale_skip" and totals:
            count = max(count, int(max(totals)))
        out.append({"type": kind, "count": count, "records": len(found),
                    "first_step": min(steps) if steps else None, "last_step": max(steps) if steps else None,
                    "last": dicts[-1] if dicts else None})
    return out


def _precursors(data):
    """`diagnosis.precursors` of the run, computed once per version of its data."""
    found = getattr(data, "precursors_json", None)
    if found is None:
        found = data.precursors_json = diagnosis.precursors(data)
    return found


def _diagnosis(data):
    """`/diagnosis`: the causes and the early warning of the run, computed once per version of its data."""
    found = getattr(data, "diagnosis_json", None)
    if found is None:
        found = data.diagnosis_json = report.jsonable({
            "diagnosis": diagnosis.diagnose(data),
            "early_warning": early_warning.as_json(early_warning.from_run(data))})
    return found
