"""The postmortem report of a logdir: analysis, plain text, JSON and PNG.

`cli.py` handles arguments, loading and exit codes; this module turns a run's
`runview.RunView` into what `tb-nanwatch report` shows.  TensorFlow-free.

Names and meanings of statistics and kinds come from `stats`; every fact about the run
(first non-finite record, producer, propagators, steps watched, skips) is the view's, so
the report and the tab say the same.
"""

import json
import math
import os

import numpy as np

from tb_nanwatch import diagnosis, early_warning, failing_step, heatmap, runview, stats
from tb_nanwatch.words import COUNT_LABELS, clean, counts_words, fmt, kind_words, site_words  # noqa: F401

LOSS_SCALE_SKIP = runview.LOSS_SCALE_SKIP
# Every-step statistics shown in the trend table, in this order; the sampled
# statistics present in the window follow in table order.
TREND_EVERY_STEP = ("norm", "nan", "posinf", "neginf")


class RunReport:
    """What the report says about one (run, group): its view's facts, the diagnosis, the
    warning signs and the early warning."""

    def __init__(self, data):
        self.data = view = runview.as_view(data)
        self.run = view.run
        self.group = view.group
        self.first = view.first
        self.producer = view.producer
        self.steps_watched, self.last_step = view.steps_watched, view.last_step
        self.skips = view.skips
        self.skipped_steps = view.skipped_steps
        self.other_events = view.other_events
        self.propagators = view.propagators
        # The failing step's bundle, the producer layer's ops and their lines, the replay
        # (read once: the diagnosis ranks with the same replay).
        self.failing = failing_step.facts(
            view.run_dir, self.first.get("layer") if self.first else None
        )
        self.precursors = diagnosis.precursors(view)
        self.diagnosis = diagnosis.diagnose(view, replay=(self.failing or {}).get("replay"))
        self.early_warning = early_warning.from_run(view)
        self.loss_progress = view.loss_progress
        self._frozen = None

    def freeze(self, max_propagators=10, trend_steps=12):
        """Work out the JSON and the text now (with these options), so that `release()` can
        let the view go: a report of a sweep keeps words, not rows."""
        self._frozen = (self.as_json(), self.text(max_propagators, trend_steps))

    def release(self):
        """Drops the view (after `freeze`); the PNG can no longer be drawn from this report."""
        if self._frozen is None:
            self.freeze()
        self.data = None

    def trend(self, max_steps=12):
        """(title, header, rows) of the producer's statistics up to the first non-finite step.

        Flight rows (one per step) when present.  Sampled statistics that a flight row
        lacks are taken from a logged row ending at that very step (sampled statistics
        are measured on a row's last step, so they are exact there).  Without a flight
        recorder, the logged rows up to the one that holds the first step."""
        if self.first is None or self.producer is None:
            return None
        s = self.producer
        step = self.first["step"]
        col = stats.STAT_INDEX
        keep = self.data.flight_steps <= step
        if keep.any():
            steps = self.data.flight_steps[keep]
            rows = self.data.flight_rows[keep][:, s, :].copy()
            by_step = {int(t): i for i, t in enumerate(self.data.steps)}
            for i, t in enumerate(steps):
                j = by_step.get(int(t))
                if j is not None:
                    logged = self.data.rows[j, s]
                    for st in stats.STATS:
                        if not st.every_step and np.isnan(rows[i, col[st.name]]):
                            rows[i, col[st.name]] = logged[col[st.name]]
            title = "flight recorder, one row per step"
            step_label = "step"
        else:
            upto = np.nonzero(self.data.steps >= step)[0]
            end = upto[0] + 1 if len(upto) else len(self.data.steps)
            steps = self.data.steps[:end]
            rows = self.data.rows[:end, s, :]
            if not len(steps):
                return None
            every = (
                int(np.nanmax(rows[:, col["steps"]]))
                if not np.all(np.isnan(rows[:, col["steps"]]))
                else 1
            )
            title = (
                "logged rows ending at the step shown, up to %d steps each; no flight recorder in this run"
                % every
            )
            step_label = "row end"
        if max_steps and len(steps) > max_steps:
            steps, rows = steps[-max_steps:], rows[-max_steps:]
        names = list(TREND_EVERY_STEP) + [
            st.name
            for st in stats.STATS
            if not st.every_step and not np.all(np.isnan(rows[:, col[st.name]]))
        ]
        table = []
        for t, r in zip(steps, rows):
            table.append(
                [str(int(t))]
                + [fmt(r[col[n]], count=stats.STATS_BY_NAME[n].scale == "count") for n in names]
            )
        return title, [step_label] + names, table

    # -- output -----------------------------------------------------------------
    def as_json(self):
        if self._frozen is not None:
            return self._frozen[0]
        first = self.first
        if first is not None and "propagators" not in first:
            first = dict(first, propagators=self.propagators)  # recovered from the rows
        out = {
            "run": self.run,
            "first_nonfinite": jsonable(first),
            "steps_watched": int(self.steps_watched),
            "last_step": None if self.last_step is None else int(self.last_step),
            "loss_scale_skips": jsonable(self.skips),
            "skipped_steps": int(self.skipped_steps),
            "events": jsonable(self.other_events),
            "precursors": jsonable(self.precursors),
            "diagnosis": jsonable(self.diagnosis),
            "early_warning": jsonable(early_warning.as_json(self.early_warning)),
            "loss_progress": jsonable(self.loss_progress),
            "bundle": jsonable((self.failing or {}).get("bundle")),
            "producer_ops": jsonable((self.failing or {}).get("producer_ops", [])),
            "replay": jsonable((self.failing or {}).get("replay")),
        }
        if self.group is not None:
            out["group"] = self.group
        return out

    def summary_line(self):
        """The run in one line, for the list that comes before the details."""
        name = clean(self.run) + (
            "" if self.group is None else " [site list %s]" % clean(self.group)
        )
        if self.first is None:
            line = "%s: finite, %s" % (name, _steps(self.steps_watched, self.last_step))
            if self.loss_progress is not None:
                line += "; %s" % _progress_words(self.loss_progress)
            if self.skips:
                line += "; %d loss-scale skip%s (by design)" % (
                    self.skipped_steps,
                    "" if self.skipped_steps == 1 else "s",
                )
            return line
        counts = counts_words(self.first, only_nonzero=True)
        line = "%s: first non-finite at step %d in %s%s" % (
            name,
            self.first["step"],
            site_words(self.first),
            " (%s)" % counts if counts else "",
        )
        if self.skips:
            line += "; also %d loss-scale skip%s (by design)" % (
                self.skipped_steps,
                "" if self.skipped_steps == 1 else "s",
            )
        return line

    def text(self, max_propagators=10, trend_steps=12):
        if self._frozen is not None:
            return self._frozen[1]
        name = clean(self.run) + (
            "" if self.group is None else " [site list %s]" % clean(self.group)
        )
        lines = []
        if self.first is None:
            line = "run %s: finite: no NaN or Inf in the %s watched" % (
                name,
                _steps(self.steps_watched, self.last_step),
            )
            if self.skips:
                line += "; %s" % _skips_words(self.skips, self.skipped_steps)
            progress = self.loss_progress
            # Other events (e.g. a collapsed loss scale) can matter without any NaN.
            return (
                [line]
                + (
                    []
                    if progress is None
                    else [
                        "  %s: %s"
                        % (
                            _progress_words(progress),
                            stats.RUN_STATE_MEANINGS[
                                "healthy" if progress["progress"] else "no_progress"
                            ],
                        )
                    ]
                )
                + ["  " + _event_words(e) for e in self.other_events[:5]]
                + [
                    "  warning sign at step %d: %s" % (p["step"], clean(p["text"]))
                    for p in self.precursors
                ]
                + self.why_lines("  why to worry (finite so far, most likely first):")
            )
        f = self.first
        lines.append("run %s: first non-finite value at step %d" % (name, f["step"]))
        lines.append(
            "  producer:   %s  (%s)"
            % (site_words(f), stats.KIND_MEANINGS.get(f["kind"], f["kind"]))
        )
        lines.append("              %s" % counts_words(f))
        if f.get("backward_of"):
            lines.append(
                "              computed in the backward pass of: %s"
                % ", ".join(clean(x) for x in f["backward_of"])
            )
        lines += self.failing_step_lines()
        if f.get("source") == "rows":
            lines.append(
                "              (the first-non-finite record is missing, e.g. the run was killed while"
                " writing it; step and site come from the logged rows, counts cover the whole row)"
            )
        if self.propagators:
            lines.append(
                "  reached in the same step (%d propagator%s, execution order):"
                % (len(self.propagators), "" if len(self.propagators) == 1 else "s")
            )
            shown = self.propagators if max_propagators <= 0 else self.propagators[:max_propagators]
            width = max(len(site_words(p)) for p in shown)
            for p in shown:
                lines.append(
                    "    %-*s  %s" % (width, site_words(p), counts_words(p, only_nonzero=True))
                )
            if len(shown) < len(self.propagators):
                lines.append(
                    "    ... and %d more (--propagators 0 lists all; --json has all)"
                    % (len(self.propagators) - len(shown))
                )
        else:
            lines.append("  reached no other site in the same step")
        trend = self.trend(trend_steps)
        if trend is not None:
            title, header, table = trend
            lines.append("  before it, %s (%s):" % (clean(self.data.labels[self.producer]), title))
            widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
            lines.append("    " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
            for r in table:
                lines.append("    " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if table and int(table[-1][0]) < f["step"]:
                lines.append(
                    "    (no row for step %d itself: it was lost, e.g. the run was killed while writing it)"
                    % f["step"]
                )
        elif self.producer is None:
            lines.append("  (the producer is not in this run's site list; no trend available)")
        if self.precursors:
            lines.append("  warning signs up to that step (finite, but often the cause):")
            for p in self.precursors:
                lines.append("    step %d: %s" % (p["step"], clean(p["text"])))
        lines += self.why_lines("  why (most likely first):")
        if self.skips:
            lines.append("  " + _skips_words(self.skips, self.skipped_steps))
        for e in self.other_events[:5]:
            lines.append("  " + _event_words(e))
        if len(self.other_events) > 5:
            lines.append("  ... and %d more events (--json has all)" % (len(self.other_events) - 5))
        lines.append("  watched: %s" % _steps(self.steps_watched, self.last_step))
        return lines

    def failing_step_lines(self):
        """Where the producer's ops come from in the user's code, the replay's verdict and the
        repro bundle, when the run directory holds them."""
        facts = self.failing or {}
        lines = []
        replay = facts.get("replay")
        if replay and replay.get("op"):
            lines.append(
                "              op %s, %s on replay"
                % (clean(failing_step.op_words(replay["op"])), clean(replay.get("verdict")))
            )
        elif replay:
            lines.append("              on replay: %s" % clean(replay.get("verdict")))
        tried = failing_step.remedy_words(replay)
        if tried:
            lines.append("              remedies on replay: %s" % clean("; ".join(tried)))
        ops = facts.get("producer_ops") or []
        if ops and not (replay and replay.get("op")):
            shown = ", ".join(clean(failing_step.op_words(op)) for op in ops[:4])
            more = " and %d more" % (len(ops) - 4) if len(ops) > 4 else ""
            lines.append("              its ops in your code: %s%s" % (shown, more))
        if facts.get("bundle"):
            b = facts["bundle"]
            lines.append(
                "  repro bundle: %s (step %d: the batch, and the weights and optimizer state "
                "before it); replay it: tb-nanwatch replay %s"
                % (clean(b["path"]), b["step"], clean(os.path.dirname(b["path"])))
            )
        for problem in facts.get("problems", []):
            lines.append("  (%s)" % clean(problem))
        return lines

    def why_lines(self, lead):
        """The "Why" section: the ranked causes with evidence and remedy, and the early warning."""
        lines = []
        if self.diagnosis:
            lines.append(lead)
            for i, d in enumerate(self.diagnosis, 1):
                lines.append("    %d. %s: %s" % (i, d["cause"], d["title"]))
                lines.append("       evidence: %s" % clean(d["evidence"]))
                lines.append("       remedy:   %s" % clean(d["remedy"]))
        if self.early_warning is not None:
            lines.append("  " + early_warning_words(self.early_warning))
        return lines


def early_warning_words(w):
    """`early warning at step 120: dense, weight kernel on course to pass float32's largest value by step 171 ...`."""
    text = (
        "early warning at step %d: %s on course to pass %s's largest value by step %d (norm %s, x%.3g a step"
        % (
            w["step"],
            site_words(w),
            w.get("dtype") or "its dtype",
            w["predicted_step"],
            fmt(w.get("norm")),
            w.get("growth_per_step", float("nan")),
        )
    )
    return text + (
        "; written by the writer)" if w.get("source") == "event" else "; from the logged norms)"
    )


def _progress_words(p):
    """`loss 0.693 at step 0, 0.0512 at step 159: healthy` (or `finite`), from stats.loss_progress."""
    return "loss %s at step %d, %s at step %d: %s" % (
        fmt(p["first"]),
        p["first_step"],
        fmt(p["last"]),
        p["last_step"],
        stats.RUN_STATE_WORDS["healthy" if p["progress"] else "no_progress"],
    )


def _steps(n, last):
    text = "%d step%s" % (n, "" if n == 1 else "s")
    if last is not None:
        text += " (last step %d)" % last
    return text


def _event_words(event):
    """`event at step 15: loss_scale_collapse (loss_scale 0.5)`."""
    if not isinstance(event, dict):
        return "event: %s" % clean(event)
    rest = ", ".join(
        "%s %s" % (clean(k), clean(v))
        for k, v in sorted(event.items())
        if k not in ("type", "step")
    )
    return clean(
        "event at step %s: %s%s"
        % (event.get("step", "?"), event.get("type", "?"), " (%s)" % rest if rest else "")
    )


def _skips_words(skips, n_skipped):
    steps = sorted({int(e.get("step", -1)) for e in skips})
    shown = ", ".join(str(s) for s in steps[:10]) + (", ..." if len(steps) > 10 else "")
    scale = skips[-1].get("loss_scale")
    scale_text = "" if scale is None else "; loss scale now %g" % scale
    return (
        "%d loss-scale skip%s (step%s %s%s): skipped by design by the LossScaleOptimizer"
        " (gradients overflowed, scale lowered), not the blow-up"
        % (
            n_skipped,
            "" if n_skipped == 1 else "s",
            "" if len(steps) == 1 else "s",
            shown,
            scale_text,
        )
    )


def jsonable(value):
    """Plain JSON types: numpy scalars unwrapped, NaN/Inf as null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return value


def merge_groups(reports):
    """One JSON entry per run: the earliest first non-finite over its site lists
    (a model whose structure changed writes a second list)."""
    by_run = {}
    for rep in reports:
        by_run.setdefault(rep.run, []).append(rep)
    out = []
    for run, reps in by_run.items():
        if len(reps) == 1:
            out.append(reps[0].as_json())
            continue
        entries = [r.as_json() for r in reps]
        firsts = [e for e in entries if e["first_nonfinite"] is not None]
        first = min(firsts, key=lambda e: e["first_nonfinite"]["step"]) if firsts else None
        merged = {
            "run": run,
            "first_nonfinite": None
            if first is None
            else dict(first["first_nonfinite"], group=first.get("group")),
            "steps_watched": sum(e["steps_watched"] for e in entries),
            "last_step": max(
                (e["last_step"] for e in entries if e["last_step"] is not None), default=None
            ),
            "loss_scale_skips": [s for e in entries for s in e["loss_scale_skips"]],
            "events": [s for e in entries for s in e["events"]],
            "groups": entries,
        }
        out.append(merged)
    return out


# -- PNG ----------------------------------------------------------------------
# Cell colours, ramp and status words are the statistics table's (the tab draws with the
# same ones, through /info); the rest are this image's own.
STATUS_COLOUR = {
    code: stats.STATUS_COLOURS[name]
    for code, name in enumerate(stats.STATUS_NAMES)
    if name in stats.STATUS_COLOURS
}
MARK = stats.STATUS_COLOURS["nan"]  # the first cell's markers and the producer's label
OUTLINE = stats.FIRST_CELL_OUTLINE
SKIP = (120, 120, 120)  # tick above a column holding a loss-scale skip
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
# Above this many sites, the image has one row per layer (the worst of its sites).
PNG_MAX_SITE_ROWS = 120


def _font(size, bold=False):
    from PIL import ImageFont

    for name in (
        ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"),
        "/usr/share/fonts/truetype/dejavu/" + ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"),
        "LiberationSans-Bold.ttf" if bold else "LiberationSans-Regular.ttf",
        "Arial.ttf",
    ):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _normalise(values, scale):
    """Values -> [0, 1] by the statistic's scale; returns (t, lo, hi, transformed?)."""
    finite = np.isfinite(values)
    if scale in ("log", "count"):
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log10(np.abs(values)) if scale == "log" else np.log10(1 + np.abs(values))
        finite &= np.isfinite(v)
    else:
        v = values
    if not finite.any():
        return np.zeros_like(values), None, None
    lo, hi = float(np.min(v[finite])), float(np.max(v[finite]))
    t = np.zeros_like(values) if hi <= lo else (v - lo) / (hi - lo)
    t = np.where(finite, t, 0.0)
    back = {"log": lambda x: 10**x, "count": lambda x: 10**x - 1}.get(scale, lambda x: x)
    return t, back(lo), back(hi)


def _fit(draw, text, font, width):
    """`text`, shortened with an ellipsis in the middle to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 1
        short = text[: keep // 2] + "…" + text[-(keep - keep // 2) :]
        if draw.textlength(short, font=font) <= width:
            return short
    return text[:4]


def cell_colours(values, status, scale, danger_low=False):
    """[rows, cols, 3] uint8 cells as the tab colours them, and the ramp's (lo, hi): the
    table's ramp (reversed where low is the danger), its colour for an exact 0 of a
    magnitude, white where not measured, the status colours over everything."""
    t, lo, hi = _normalise(values, scale)
    if danger_low:
        t = 1.0 - t
    rgb = stats.ramp_colour(t)
    rgb[~np.isfinite(values)] = stats.NOT_MEASURED_COLOUR
    if scale == "log":
        rgb[values == 0] = stats.ZERO_COLOUR
    for code, colour in STATUS_COLOUR.items():
        rgb[status == code] = colour
    return rgb.astype(np.uint8), lo, hi


def column_words(hm, c):
    """`95` for a one-step column, `0-94` for a wider one (as the tab labels them)."""
    a, b = int(hm.first_steps[c]), int(hm.last_steps[c])
    return str(a) if a == b else "%d-%d" % (a, b)


def _png_heatmap(rep, stat, kind, max_columns):
    """The heatmap the image shows: rows (sites, or layers for a big model), its source
    and statistic; the first non-finite step's row is a column of its own, as in the tab."""
    data = rep.data
    source = "rows" if len(data.steps) or not len(data.flight_steps) else "flight"
    if stat is None:
        stat = stats.DEFAULT_STAT if source == "rows" else "norm"
    first_step = None if rep.first is None else int(rep.first["step"])
    n_sites = sum(1 for s in data.sites if kind is None or s["kind"] == kind)
    mode = "tree" if n_sites > PNG_MAX_SITE_ROWS else "sites"
    hm = heatmap.build(
        data,
        stat=stat,
        kind=kind,
        max_columns=max_columns,
        source=source,
        rows_mode=mode,
        first_step_of_run=first_step,
    )
    if mode == "tree":  # layers only: their rows, labels and the producer's layer
        keep = [r for r, n in enumerate(hm.tree.nodes) if n.level == "layer"]
        hm.row_labels = [hm.tree.nodes[r].name for r in keep]
        hm.row_members = [
            set(int(i) for i in hm.tree.order[hm.tree.nodes[r].start : hm.tree.nodes[r].end])
            for r in keep
        ]
        hm.values, hm.status, hm.late = hm.values[keep], hm.status[keep], hm.late[keep]
    else:
        hm.row_labels = list(hm.labels)
        hm.row_members = [{i} for i in hm.site_indices]
    hm.rows_mode = mode
    return hm, source, stat


def _png_title(rep, hm, stat, kind):
    st = stats.STATS_BY_NAME[stat]
    n_cols = len(hm.first_steps)
    run_name = clean(rep.run) + ("" if rep.group is None else " [%s]" % clean(rep.group))
    if rep.first is not None:
        title = "%s: first non-finite at step %d: %s (%s)" % (
            run_name,
            rep.first["step"],
            site_words(rep.first),
            counts_words(rep.first, only_nonzero=True) or "counts lost",
        )
    else:
        title = "%s: no NaN or Inf in %s" % (run_name, _steps(rep.steps_watched, rep.last_step))
    span = ("steps %d-%d" % (hm.first_steps[0], hm.last_steps[-1])) if n_cols else "no rows"
    per_col = ""
    if n_cols:
        widths = hm.last_steps - hm.first_steps + 1
        per_col = (
            ", 1 step per column"
            if widths.max() == 1
            else ", %s steps per column"
            % (
                int(widths.max())
                if widths.min() == widths.max()
                else "%d-%d" % (widths.min(), widths.max())
            )
        )
    rows = (
        "every layer (the worst of its sites), layers"
        if hm.rows_mode == "tree"
        else "every site, sites"
    )
    subtitle = "%s of %s in execution order (%s), %s%s%s" % (
        stat,
        rows,
        st.meaning,
        span,
        per_col,
        "" if kind is None else ", kind %s" % kind,
    )
    return title, subtitle


def _draw_cells(img, hm, st, gx, gy, cell_w, cell_h):
    """The cells, and white stripes over the late ones (finite at the first non-finite
    step, non-finite later in its column).  Returns the ramp's (lo, hi)."""
    from PIL import Image, ImageDraw

    cells, lo, hi = cell_colours(hm.values, hm.status, st.scale, st.name in stats.DANGER_LOW)
    block = np.repeat(np.repeat(cells, cell_h, axis=0), cell_w, axis=1)
    img.paste(Image.fromarray(block, "RGB"), (gx, gy))
    draw = ImageDraw.Draw(img)
    for r, c in zip(*np.nonzero(hm.late)):
        x0, y0 = gx + c * cell_w, gy + r * cell_h
        for d in range(-cell_h, cell_w, 4):
            a = (x0 + max(d, 0), y0 + cell_h - 1 - max(-d, 0))
            b = (
                x0 + min(d + cell_h - 1, cell_w - 1),
                y0 + cell_h - 1 - (min(d + cell_h - 1, cell_w - 1) - d),
            )
            draw.line([a, b], fill=BACKGROUND, width=1)
    return lo, hi


def _draw_row_labels(
    draw, hm, labels, producer_row, gx, gy, cell_h, label_w, grid_w, margin, font, data
):
    label_every = max(1, math.ceil(11 / cell_h))  # no overlapping labels when rows are thin
    if hm.rows_mode == "sites":
        # Separators between the phases of a step.  The optimizer updates each weight
        # right after its slots, so optimizer_state and weight are one phase.
        phases = [stats.PHASES.get(data.sites[i]["kind"]) for i in hm.site_indices]
        for r in range(1, len(labels)):
            if phases[r] != phases[r - 1]:
                ry = gy + r * cell_h
                draw.line([(margin, ry), (gx + grid_w - 1, ry)], fill=(150, 150, 150), width=1)
    for r, label in enumerate(labels):
        is_producer = r == producer_row
        near_producer = producer_row is not None and 0 < abs(r - producer_row) * cell_h < 12
        if is_producer or (r % label_every == 0 and not near_producer):
            draw.text(
                (gx - 6, gy + r * cell_h + cell_h / 2),
                _fit(draw, label, font, label_w - 16),
                font=font,
                anchor="rm",
                fill=MARK if is_producer else TEXT,
            )
    if producer_row is not None:
        ry = gy + producer_row * cell_h + cell_h / 2
        draw.polygon([(gx - 4, ry), (gx - 1, ry - 3), (gx - 1, ry + 3)], fill=MARK)


def _draw_step_axis(draw, hm, gx, gy, grid_w, grid_h, cell_w, font):
    """Few columns: each labelled with the steps it covers.  Many: evenly spaced columns
    labelled with their first step (the tab's convention too)."""
    n_cols = len(hm.first_steps)
    if not n_cols:
        return
    words = [column_words(hm, c) for c in range(n_cols)]
    if all(draw.textlength(w, font=font) + 6 <= cell_w for w in words):
        chosen, caption = range(n_cols), "training steps of each column"
    else:
        n_ticks = min(n_cols, max(2, grid_w // 70))
        chosen = sorted(set(np.linspace(0, n_cols - 1, n_ticks).round().astype(int)))
        words = [str(int(s)) for s in hm.first_steps]
        caption = "training step (first step of the column)"
    for c in chosen:
        x = gx + c * cell_w + cell_w / 2
        draw.line([(x, gy + grid_h), (x, gy + grid_h + 4)], fill=MUTED)
        draw.text((x, gy + grid_h + 6), words[c], font=font, fill=MUTED, anchor="ma")
    draw.text((gx + grid_w / 2, gy + grid_h + 20), caption, font=font, fill=MUTED, anchor="ma")


def _skip_columns(rep, hm):
    steps = [int(e["step"]) for e in rep.skips if isinstance(e.get("step"), (int, float))]
    return sorted({int(c) for c in heatmap.columns_of(hm, steps) if c >= 0})


def _draw_first_cell(draw, rep, hm, producer_row, gx, gy, cell_w, cell_h, font):
    """Outlines the first non-finite cell (the column holding its step); returns [row, col]."""
    if rep.first is None or producer_row is None or not len(hm.first_steps):
        return None
    step = int(rep.first["step"])
    c = int(heatmap.columns_of(hm, [step])[0])
    if c < 0:
        return None
    x0, y0 = gx + c * cell_w, gy + producer_row * cell_h
    pad = max(2, (8 - cell_w) // 2 + 2, (8 - cell_h) // 2 + 2)
    box = [x0 - pad, y0 - pad, x0 + cell_w - 1 + pad, y0 + cell_h - 1 + pad]
    # Black with a white halo on both sides: visible on every cell colour.
    draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], outline=BACKGROUND, width=1)
    draw.rectangle(box, outline=OUTLINE, width=2)
    draw.rectangle([box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2], outline=BACKGROUND, width=1)
    # A marker above the grid finds the column even when cells are 2 px wide; it names the
    # column's steps, as the tab's tick does.
    mx = x0 + cell_w / 2
    draw.polygon([(mx, gy - 2), (mx - 5, gy - 9), (mx + 5, gy - 9)], fill=MARK)
    words = column_words(hm, c)
    draw.text(
        (mx + 8, gy - 5),
        "step %d%s" % (step, "" if words == str(step) else " (column %s)" % words),
        font=font,
        fill=MARK,
        anchor="ls",
    )
    return [producer_row, c]


def _draw_legend(img, draw, hm, st, lo, hi, lx, ly, fonts, skips):
    from PIL import Image

    f_sub, f_small = fonts
    draw.text((lx, ly), st.name, font=f_sub, fill=TEXT)
    ly += 18
    bar_h, bar_w = 120, 14
    along = np.linspace(1, 0, bar_h)  # top: the ramp's high end
    ramp = stats.ramp_colour(1 - along if st.name in stats.DANGER_LOW else along)
    img.paste(
        Image.fromarray(ramp[:, None, :].repeat(bar_w, axis=1).astype(np.uint8), "RGB"), (lx, ly)
    )
    draw.rectangle([lx, ly, lx + bar_w - 1, ly + bar_h - 1], outline=MUTED)
    scale_note = {"log": "log scale", "count": "log scale", "linear": "linear scale"}[st.scale]
    if lo is not None:
        draw.text((lx + bar_w + 6, ly), "%.3g" % hi, font=f_small, fill=TEXT)
        draw.text((lx + bar_w + 6, ly + bar_h), "%.3g" % lo, font=f_small, fill=TEXT, anchor="ld")
    draw.text((lx + bar_w + 6, ly + bar_h / 2), scale_note, font=f_small, fill=MUTED, anchor="lm")
    ly += bar_h + 12
    entries = [
        (stats.STATUS_COLOURS[n], stats.STATUS_WORDS[n])
        for n in stats.STATUS_NAMES
        if n in stats.STATUS_COLOURS
    ]
    if st.scale == "log":
        entries.append((stats.ZERO_COLOUR, "exactly 0"))
    entries.append((stats.NOT_MEASURED_COLOUR, "not measured"))
    for colour, text in entries:
        draw.rectangle([lx, ly, lx + 13, ly + 11], fill=tuple(colour), outline=MUTED)
        draw.text((lx + 20, ly + 6), text, font=f_small, fill=TEXT, anchor="lm")
        ly += 17
    draw.rectangle([lx - 1, ly - 1, lx + 14, ly + 12], outline=OUTLINE, width=2)
    draw.text((lx + 20, ly + 6), "first non-finite", font=f_small, fill=TEXT, anchor="lm")
    if hm.late.any():
        ly += 17
        draw.rectangle([lx, ly, lx + 13, ly + 11], fill=MARK, outline=MUTED)
        for d in range(-11, 13, 4):
            draw.line(
                [
                    (lx + max(d, 0), ly + 11 - max(-d, 0)),
                    (lx + min(d + 11, 13), ly + 11 - (min(d + 11, 13) - d)),
                ],
                fill=BACKGROUND,
            )
        draw.text(
            (lx + 20, ly + 6),
            "non-finite only later in that column",
            font=f_small,
            fill=TEXT,
            anchor="lm",
        )
    if skips:
        ly += 17
        draw.line([(lx + 6, ly), (lx + 6, ly + 10)], fill=SKIP, width=3)
        draw.text(
            (lx + 20, ly + 6), "loss-scale skip (by design)", font=f_small, fill=TEXT, anchor="lm"
        )


def render_png(rep, path, stat=None, kind=None, max_columns=450):
    """The heatmap of one run as a PNG, as the tab draws it: sites (layers, for a model of
    more than PNG_MAX_SITE_ROWS sites) x steps, labels, the table's colours and words,
    the first non-finite cell outlined in the column of its own, a title in words.

    stat None: the table's default, or norm (measured at every step) for a run that has only
    its flight recorder (killed before its first row), whose sampled statistics exist at one
    step only."""
    from PIL import Image, ImageDraw, PngImagePlugin

    hm, source, stat = _png_heatmap(rep, stat, kind, max_columns)
    st = stats.STATS_BY_NAME[stat]
    n_rows, n_cols = len(hm.row_labels), len(hm.first_steps)
    f_title, f_sub, f_label, f_small = _font(16, bold=True), _font(12), _font(11), _font(10)
    cell_w = max(2, min(24, 900 // max(n_cols, 1)))
    cell_h = max(3, min(14, 1400 // max(n_rows, 1)))
    margin = 12
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [clean(l) for l in hm.row_labels]
    label_w = (
        math.ceil(min(380, max([scratch.textlength(l, font=f_label) for l in labels] + [60]))) + 16
    )
    grid_w, grid_h = cell_w * max(n_cols, 1), cell_h * max(n_rows, 1)

    title, subtitle = _png_title(rep, hm, stat, kind)
    legend_w = 230
    text_w = max(scratch.textlength(title, font=f_title), scratch.textlength(subtitle, font=f_sub))
    width = max(
        margin * 2 + label_w + grid_w + 20 + legend_w,
        min(math.ceil(text_w) + 2 * margin, 1600),
        640,
    )
    top = margin + 24 + 18 + 22
    height = max(top + grid_h + 40 + margin, top + 350)
    img = Image.new("RGB", (int(width), int(height)), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text(
        (margin, margin), _fit(draw, title, f_title, width - 2 * margin), font=f_title, fill=TEXT
    )
    draw.text(
        (margin, margin + 24),
        _fit(draw, subtitle, f_sub, width - 2 * margin),
        font=f_sub,
        fill=TEXT,
    )

    gx, gy = margin + label_w, top
    lo = hi = None
    if n_cols and n_rows:
        lo, hi = _draw_cells(img, hm, st, gx, gy, cell_w, cell_h)
    else:
        draw.text((gx + 4, gy + 4), "no rows logged", font=f_sub, fill=MUTED)
    producer_row = next(
        (r for r, members in enumerate(hm.row_members) if rep.producer in members), None
    )
    _draw_row_labels(
        draw, hm, labels, producer_row, gx, gy, cell_h, label_w, grid_w, margin, f_label, rep.data
    )
    _draw_step_axis(draw, hm, gx, gy, grid_w, grid_h, cell_w, f_small)
    skip_cols = _skip_columns(rep, hm) if n_cols else []
    for c in skip_cols:
        mx = gx + c * cell_w + cell_w / 2
        draw.line([(mx, gy - 7), (mx, gy - 2)], fill=SKIP, width=max(1, min(3, cell_w - 1)))
    first_cell = _draw_first_cell(draw, rep, hm, producer_row, gx, gy, cell_w, cell_h, f_small)
    _draw_legend(img, draw, hm, st, lo, hi, gx + grid_w + 20, gy, (f_sub, f_small), skip_cols)

    # Where things are, for scripts and tests reading the image back (PNG tEXt chunk).
    info = PngImagePlugin.PngInfo()
    layout = dict(
        run=rep.run,
        group=rep.group,
        stat=stat,
        kind=kind,
        source=source,
        rows=hm.rows_mode,
        grid=[gx, gy, cell_w, cell_h, n_cols, n_rows],
        first_step=None if rep.first is None else rep.first["step"],
        first_cell=first_cell,
        skip_columns=skip_cols,
        column_first_steps=[int(x) for x in hm.first_steps],
        column_last_steps=[int(x) for x in hm.last_steps],
    )
    info.add_itxt("tb-nanwatch", json.dumps(layout))
    img.save(path, format="PNG", pnginfo=info)
    return img.size, stat
