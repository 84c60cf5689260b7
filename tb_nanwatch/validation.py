"""The one gate nanwatch content passes before anything reads it.  TensorFlow-free.

Event files can be damaged, half-written, written by another version or by hand.  The
reader (`reader.read_run`) sends every record through these functions; each either
returns a clean value or says what is wrong in words, and the reader drops that record
with a warning naming run, tag and step.  What is left is what the report, the plugin
and the heatmap may rely on:

* metadata: a dict with an integer `version` and a `record` name; for rows and flight
  rows a list of sites (`layer`, `kind` of `stats.KINDS`, `tensor` strings) and unique
  statistic names;
* rows and flight rows: real-valued matrices [n_sites, n_stat_names], counts whole and
  >= 0, `steps` >= 1 and no more than the steps up to the row's own, a first non-finite
  step within them;
* first-non-finite record: a JSON object naming a site, with whole counts >= 0;
* events: a JSON list of objects with a `type` string and, where present, a whole `step`
  and numbers for `loss_scale` and `skips_total`.
"""

import json
import math

import numpy as np

from tb_nanwatch import metadata, stats


class InvalidData(ValueError):
    """Nanwatch content that cannot be read at all (e.g. a site list that is not one)."""


# Steps and counts must fit an int64 exactly (and float64 holds integers exactly to 2**53).
MAX_COUNT = 2.0**53
# Counts and step numbers: whole numbers >= 0 (or NaN: not measured).
_COUNT_STATS = ("size", "nan", "posinf", "neginf", "nonfinite_steps")


def _is_whole(x, lo=0):
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(x)
        and float(x).is_integer()
        and lo <= x < MAX_COUNT
    )


def is_step(step):
    """A training step: whole, >= 0, below 2**53 (exact in float64; no training gets near)."""
    return _is_whole(step)


def parse_json(raw, what):
    """The JSON value of a string tensor (a numpy bytes/str scalar or 1-element array)."""
    value = raw
    if isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "OSU":
            raise InvalidData(
                "%s is not a string (a %s tensor of shape %s)" % (what, value.dtype, value.shape)
            )
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidData("%s is not UTF-8: %s" % (what, e))
    if not isinstance(value, str):
        raise InvalidData("%s is not a string" % what)
    try:
        return json.loads(value)
    except RecursionError:
        raise InvalidData("%s is JSON nested too deep" % what)
    except ValueError as e:
        raise InvalidData("%s is not JSON: %s" % (what, e))


def content(raw, record):
    """The checked metadata dict of a tag of `record` (from its plugin content bytes):
    raises InvalidData, or metadata.MetadataError for a version this reader cannot read."""
    parsed = parse_json(bytes(raw), "the metadata of the %s tag" % record)
    if not isinstance(parsed, dict):
        raise InvalidData("the metadata of the %s tag is not a JSON object" % record)
    version = parsed.get("version")
    if not _is_whole(version, lo=1):
        raise InvalidData(
            "the metadata of the %s tag has version %r, expected a whole number" % (record, version)
        )
    parsed = metadata.parse_plugin_metadata(bytes(raw))  # newer versions are refused there
    if record in (metadata.ROWS, metadata.FLIGHT):
        parsed["sites"] = sites(parsed.get("sites"), record)
        parsed["stats"] = stat_names(parsed.get("stats", list(stats.STAT_NAMES)), record)
    return parsed


def _json_words(value):
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a list"


def sites(value, record="rows"):
    """A clean copy of a site list, or InvalidData naming the first bad site."""
    if not isinstance(value, list):
        raise InvalidData(
            "the site list of the %s tag is %s, not a list" % (record, _json_words(value))
        )
    out = []
    for i, site in enumerate(value):
        if not isinstance(site, dict):
            raise InvalidData("site %d of the %s tag is not an object" % (i, record))
        layer, kind, tensor = site.get("layer"), site.get("kind"), site.get("tensor", "")
        if not isinstance(layer, str) or not isinstance(tensor, str):
            raise InvalidData(
                "site %d of the %s tag: layer and tensor must be strings" % (i, record)
            )
        if kind not in stats.KINDS:
            raise InvalidData(
                "site %d of the %s tag has kind %r; expected one of %s"
                % (i, record, kind, ", ".join(stats.KINDS))
            )
        shape = site.get("shape", [])
        if not isinstance(shape, list) or not all(_is_whole(d, lo=-1) for d in shape):
            shape = []
        dtype = site.get("dtype", "")
        out.append(
            dict(
                site,
                layer=layer,
                kind=kind,
                tensor=tensor,
                shape=[int(d) for d in shape],
                dtype=dtype if isinstance(dtype, str) else "",
            )
        )
    return out


def stat_names(value, record="rows"):
    if (
        not isinstance(value, list)
        or not all(isinstance(n, str) for n in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidData(
            "the statistic names of the %s tag are not a list of distinct strings" % record
        )
    return value


def matrix_problem(value, n_sites, n_stats):
    """None when `value` can be a row of n_sites x n_stats (as written, before the reader
    maps its columns onto the table), else what is wrong with it."""
    if not isinstance(value, np.ndarray):
        return "not an array"
    if value.dtype.kind not in "fiu" or value.dtype.itemsize > 8:
        return "a %s tensor, expected real numbers" % value.dtype
    if value.shape != (n_sites, n_stats):
        return "shape %s, expected %s (sites x statistics in the metadata)" % (
            list(value.shape),
            [n_sites, n_stats],
        )
    return None


def row_problems(steps, rows):
    """[None or what is wrong] per row, for rows [n, n_sites, n_table_stats] already in
    table order (`metadata.decode_rows`) ending at steps[n]."""
    rows = np.asarray(rows, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    out = [None] * len(rows)
    if not len(rows):
        return out
    col = stats.STAT_INDEX

    def check(bad, words):
        for i in np.nonzero(bad)[0]:
            if out[i] is None:
                out[i] = words

    check(steps < 0, "a negative step")
    check(steps >= MAX_COUNT, "a step beyond 2**53")
    for name in _COUNT_STATS:
        if name not in col:
            continue
        values = rows[..., col[name]]
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(values) & ~(
                (values >= 0) & (values < MAX_COUNT) & (values == np.floor(values))
            )
        check(bad.any(axis=1), "%s is not a whole number >= 0" % name)
    if "steps" in col:
        covered = rows[..., col["steps"]]
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(covered) & ~(
                (covered >= 1) & (covered <= steps[:, None] + 1) & (covered == np.floor(covered))
            )
        check(bad.any(axis=1), "steps is not a whole number between 1 and the row's step + 1")
    if "first_nonfinite_step" in col:
        first = rows[..., col["first_nonfinite_step"]]
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(first) & ~(
                (first >= 0) & (first <= steps[:, None]) & (first == np.floor(first))
            )
        check(bad.any(axis=1), "first_nonfinite_step is not a step up to the row's own")
    return out


def stored_row_problems(steps, stored):
    """`row_problems` of rows as stored (float32 [n, 1 + n_sites, len(DISK_STATS)], the
    current layout), checked where they lie, without copying them into the table's layout."""
    steps = np.asarray(steps, dtype=np.float64)
    out = [None] * len(stored)
    if not len(stored):
        return out

    def check(bad, words):
        for i in np.nonzero(bad)[0]:
            if out[i] is None:
                out[i] = words

    check(steps < 0, "a negative step")
    check(steps >= MAX_COUNT, "a step beyond 2**53")
    names = metadata.DISK_STATS
    with np.errstate(invalid="ignore"):
        covered = stored[:, 0, 0].astype(np.float64)
        bad = ~np.isnan(covered) & ~(
            (covered >= 1) & (covered <= steps + 1) & (covered == np.floor(covered))
        )
        check(bad, "steps is not a whole number between 1 and the row's step + 1")
        present = [n for n in _COUNT_STATS if n in names]
        values = stored[:, 1:, [names.index(n) for n in present]]
        # Per row and statistic: the smallest, the largest and the largest fraction (NaN,
        # "not measured", is skipped by fmin/fmax): a few passes, no boolean copies.
        low = np.fmin.reduce(values, axis=1)
        high = np.fmax.reduce(values, axis=1)
        fraction = np.fmax.reduce(values - np.floor(values), axis=1)
        bad = (low < 0) | (high >= MAX_COUNT) | (fraction > 0)
        for i in np.nonzero(bad.any(axis=1))[0]:
            which = present[int(np.nonzero(bad[i])[0][0])]
            check(np.arange(len(out)) == i, "%s is not a whole number >= 0" % which)
        offset = stored[:, 1:, names.index(metadata.FIRST_OFFSET)].astype(np.float64)
        bad = ~np.isnan(offset) & ~(
            (offset >= 0) & (offset <= steps[:, None]) & (offset == np.floor(offset))
        )
        check(bad.any(axis=1), "first_nonfinite_step is not a step up to the row's own")
    return out


def first_nonfinite(value, step, n_sites=None):
    """(clean record, [what was cleaned away]) of a first-non-finite record (JSON already
    parsed) logged at `step`, or InvalidData.  Bad propagators and a bad `backward_of` are
    dropped, not the record: the producer is the evidence."""
    if not isinstance(value, dict):
        raise InvalidData("not a JSON object")
    record = dict(value)
    record_step = record.get("step", step)
    if not _is_whole(record_step):
        raise InvalidData("step %r is not a whole number >= 0" % (record_step,))
    record["step"] = int(record_step)
    layer, kind, tensor = record.get("layer"), record.get("kind"), record.get("tensor", "")
    if not isinstance(layer, str) or not isinstance(tensor, str) or kind not in stats.KINDS:
        raise InvalidData(
            "does not name a site (layer %r, kind %r, tensor %r)" % (layer, kind, tensor)
        )
    record["tensor"] = tensor
    for name in stats.NONFINITE_STATS:
        count = record.get(name, 0)
        if not _is_whole(count):
            raise InvalidData("%s count %r is not a whole number >= 0" % (name, count))
        record[name] = int(count)
    notes = []
    if "site" in record:
        # An index into the site list is only a shortcut; the names identify the site.
        site = record.pop("site")
        if _is_whole(site) and (n_sites is None or site < n_sites):
            record["site"] = int(site)
        else:
            notes.append(
                "site index %r is not one of the run's %s sites: dropped"
                % (site, "?" if n_sites is None else n_sites)
            )
    if "propagators" in record:
        propagators = record["propagators"]
        if not isinstance(propagators, list):
            notes.append("propagators is not a list: dropped")
            propagators = []
        kept = []
        for p in propagators:
            if (
                isinstance(p, dict)
                and isinstance(p.get("layer"), str)
                and p.get("kind") in stats.KINDS
                and isinstance(p.get("tensor", ""), str)
                and all(_is_whole(p.get(n, 0)) for n in stats.NONFINITE_STATS)
            ):
                kept.append(
                    dict(
                        p,
                        tensor=p.get("tensor", ""),
                        **{n: int(p.get(n, 0)) for n in stats.NONFINITE_STATS},
                    )
                )
        if len(kept) < len(propagators):
            notes.append(
                "%d propagator%s naming no site dropped"
                % (len(propagators) - len(kept), "" if len(propagators) - len(kept) == 1 else "s")
            )
        record["propagators"] = kept
    backward_of = record.get("backward_of")
    if backward_of is not None and not (
        isinstance(backward_of, list) and all(isinstance(x, str) for x in backward_of)
    ):
        notes.append("backward_of is not a list of names: dropped")
        del record["backward_of"]
    return record, notes


# Fields of the writer's events that the report and plugin compute with.
_EVENT_NUMBERS = ("loss_scale", "skips_total")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def events(value):
    """(clean events, number dropped) of an events record (JSON already parsed)."""
    if not isinstance(value, list):
        raise InvalidData("not a JSON list")
    kept = []
    for event in value:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            continue
        if "step" in event:
            if not _is_whole(event["step"]):
                continue
            event = dict(event, step=int(event["step"]))
        if any(name in event and not _is_number(event[name]) for name in _EVENT_NUMBERS):
            continue
        kept.append(event)
    return kept, len(value) - len(kept)
