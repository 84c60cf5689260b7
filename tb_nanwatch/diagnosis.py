"""Why a run went NaN/Inf: causes with evidence and remedies, and the warning signs before it.

Read off a run's `runview.RunView` only (sites with dtype and shape, its one timeline of
logged and flight rows, the first non-finite record, events), TensorFlow-free, shared by
the CLI and the plugin.  `diagnose` evaluates one rule per cause of `causes.CAUSES` (RULES,
keyed by cause ID) and ranks what fires; `precursors` lists finite warning signs: a
float16 tensor that underflowed to zero (Adam's velocity under the float16 policy makes
m / (sqrt(v) + eps) explode a step later), a tensor within a doubling of its dtype's
largest value.  (Loss-scale skips and a collapsed loss scale are events the writer
records itself.)
"""

import math

import numpy as np

from tb_nanwatch import causes, failing_step, op_sources, runview, stats, summary, words
from tb_nanwatch.causes import (  # the rules' thresholds, quoted in the causes' words
    DOMAIN_HEADROOM,
    DOMAIN_INPUT,
    EMBEDDING_SCALE,
    GRADIENT_DEPTH_RATIO,
    GRADIENT_GROWTH,
    GROWTH_RATE,
    GROWTH_STEADY,
    GROWTH_TOTAL,
    HEADROOM_DOUBLINGS,
    HUGE_LOSS,
    INIT_GAIN,
    INIT_RATIO,
    INPUT_SCALE,
    NORM_SCALE,
    OUTPUT_VS_LOSS,
    OVERFLOWED_OUTPUT,
    RECURRENT_INIT_RATIO,
    RECURRENT_STATE,
    UNDERFLOW_FRACTION,
    UPDATE_JUMP,
    VANISHED_FRACTION,
    VANISHED_ROWS,
)

# Where underflow is damage rather than ReLU's honest zeros: slots and weight gradients.
UNDERFLOW_KINDS = ("optimizer_state", "weight_grad")
_HALF = ("float16", "bfloat16")


def precursors(run_data, limit=8):
    """[{step, layer, kind, tensor, sign, value, text}] up to the first non-finite step
    (or the whole run when there is none), earliest first, one per site and sign;
    the first `limit` (all with limit 0 or None)."""
    view = runview.as_view(run_data)
    # The first non-finite step under the view's one rule: the record, or the rows of a
    # killed run that lost it (signs after the blow-up tell nothing about its cause).
    until = view.until
    col = stats.STAT_INDEX
    sites = view.sites
    underflow_sites = np.array(
        [s.get("dtype") in _HALF and s["kind"] in UNDERFLOW_KINDS for s in sites], bool
    )
    found = {}
    for steps, rows in ((view.timeline_steps, view.timeline_rows),):
        if not len(steps):
            continue
        with np.errstate(invalid="ignore"):
            eligible = ~(np.nan_to_num(rows[..., [col[k] for k in stats.NONFINITE_STATS]]) > 0).any(
                -1
            )
            if until is not None:  # rows that start after the blow-up tell nothing about its cause
                eligible &= (
                    steps[:, None] - np.nan_to_num(rows[..., col["steps"]], nan=1) + 1
                ) <= until
            signs = {
                "underflow": eligible
                & underflow_sites
                & (rows[..., col["underflow_frac"]] >= UNDERFLOW_FRACTION),
                "overflow_risk": eligible & (rows[..., col["headroom"]] <= HEADROOM_DOUBLINGS),
            }
        for sign, mask in signs.items():
            earliest = mask.argmax(axis=0)  # rows are in step order
            for s in np.nonzero(mask.any(axis=0))[0]:
                row, site = rows[earliest[s], s], sites[s]
                _keep(found, steps[earliest[s]], site, sign, *_words(sign, row, site))
    found = sorted(found.values(), key=lambda p: (p["step"], p["sign"]))
    return found[:limit] if limit else found


def _words(sign, row, site):
    col = stats.STAT_INDEX
    label = summary.site_label(site)
    if sign == "underflow":
        underflow, zeros = row[col["underflow_frac"]], row[col["zero_frac"]]
        words = (
            "exactly 0 (underflowed to zero, or no gradient at all)"
            if zeros >= 0.99 * underflow
            else "below %s's smallest normal value (underflow)" % site["dtype"]
        )
        return underflow, "%.0f%% of %s %s" % (100 * underflow, label, words)
    headroom = row[col["headroom"]]
    return headroom, (
        "%s within %.1f doublings of %s's largest finite value"
        % (label, max(headroom, 0.0), site.get("dtype", "its dtype"))
    )


def _keep(found, step, site, sign, value, text):
    key = (summary.site_label(site), sign)
    if key not in found or step < found[key]["step"]:
        found[key] = dict(
            step=int(step),
            layer=site["layer"],
            kind=site["kind"],
            tensor=site.get("tensor", ""),
            sign=sign,
            value=float(value),
            text=text,
        )


# -- causes ---------------------------------------------------------------------
INITIAL_FACT = 0.1  # score added when a weight's scale is read from the initial record
# Ops that overflow before anything else in a layer: a NaN out of a half-precision layer that
# computes one is Inf / Inf or Inf - Inf, not an op outside its domain.
OVERFLOWING_OPS = ("Exp", "Expm1", "Pow", "Square", "Softplus", "Sinh", "Cosh", "Exp2")


def dtype_limits(dtype):
    """(largest finite value, smallest normal value) of a float dtype name, or None."""
    if dtype == "bfloat16":
        return 3.3895313892515355e38, 1.1754943508222875e-38
    try:
        info = np.finfo(np.dtype(dtype))
    except (TypeError, ValueError):
        return None
    return float(info.max), float(info.tiny)


def largest_value(site):
    """The largest finite value of a site's dtype (float32's for an unknown one)."""
    return (dtype_limits(site.get("dtype") or "float32") or dtype_limits("float32"))[0]


def _site_json(site):
    return {"layer": site["layer"], "kind": site["kind"], "tensor": site.get("tensor", "")}


def _multiplies(site):
    """A weight that multiplies what flows through its layer, by its role (stats.WEIGHT_ROLES):
    kernels, recurrent kernels, embedding tables, normalisation scales, custom matrices."""
    return stats.weight_role(site) in stats.MULTIPLYING_ROLES


def _initial_scale(site):
    """(the largest RMS a sane initialisation gives a weight of this role, its name in words),
    or None for roles without one (biases, shifts)."""
    role, shape = stats.weight_role(site), site.get("shape") or []
    if role in ("kernel", "matrix", "recurrent_kernel"):
        fan_in = int(np.prod(shape[:-1]))
        if fan_in <= 0:
            return None
        what = "sqrt(2 / units)" if role == "recurrent_kernel" else "sqrt(2 / fan_in)"
        return math.sqrt(2.0 / fan_in), "the He scale %s" % what
    if role == "embedding":
        return EMBEDDING_SCALE, "a unit-scale embedding table"
    if role == "norm_scale":
        return NORM_SCALE, "a normalisation's starting scale 1"
    return None


def _g(value):
    """A figure in evidence text: 3 significant digits."""
    return "%.3g" % value


class Evidence:
    """What the rules read: the run's view (its one timeline of logged and flight rows,
    columns built per statistic on demand, and its first non-finite record), with the
    lookups the rules share."""

    def __init__(self, run_data):
        self.data = view = runview.as_view(run_data)
        self.sites = view.sites
        self.first = view.first
        self.until = view.until
        self.producer = view.producer
        self.steps = view.timeline_steps
        self.before = view.before
        self.events = view.events
        self._findings = {}

    def finding(self, cause_id):
        """RULES[cause_id]'s Finding on this evidence, or None; each rule runs once (a rule
        that defers to another asks here)."""
        if cause_id not in self._findings:
            self._findings[cause_id] = RULES[cause_id](self)
        return self._findings[cause_id]

    def col(self, name):
        """[n_steps, n_sites] of one statistic over the timeline."""
        return self.data.col(name)

    def nonfinite(self):
        return self.data.nonfinite()

    def finite_before(self, name):
        """The statistic where it is measured on a finite cell before the first non-finite step, else NaN."""
        return self.data.finite_before(name)

    def at(self, step, name, site):
        """The statistic of `site` at `step` (NaN if not logged)."""
        hit = np.nonzero(self.steps == step)[0]
        return float(self.col(name)[hit[-1], site]) if len(hit) else float("nan")

    def indices(self, kind, multiplying_only=False):
        return [
            i
            for i, s in enumerate(self.sites)
            if s["kind"] == kind and (not multiplying_only or _multiplies(s))
        ]

    def gradient_of(self, site):
        """The weight_grad site of a weight, or of one of its optimizer slots
        (`velocity/kernel`), or None."""
        s = self.sites[site]
        tensor = s.get("tensor", "")
        if s["kind"] == "optimizer_state":
            tensor = tensor.split("/")[-1]
        return self.data.site_index(s["layer"], "weight_grad", tensor)

    def slots_of(self, site):
        """The optimizer slot sites of a weight site."""
        s = self.sites[site]
        name = s.get("tensor", "").split("/")[-1]
        return [
            i
            for i in self.indices("optimizer_state")
            if self.sites[i]["layer"] == s["layer"]
            and self.sites[i].get("tensor", "").split("/")[-1] == name
        ]

    def loss_site(self):
        found = self.indices("loss")
        return found[0] if found else None

    def output_sites(self):
        """The model's outputs: the layers its watched targets are named after (the heads of a
        multi-output model), else the last activation before the loss."""
        named = {self.sites[i].get("tensor") for i in self.indices("target")} - {""}
        heads = [i for i in self.indices("activation") if self.sites[i]["layer"] in named]
        out = self.output_site()
        return heads or ([out] if out is not None else [])

    def output_site(self):
        """The last activation before the loss: the model's output."""
        loss = self.loss_site()
        acts = [i for i in self.indices("activation") if loss is None or i < loss]
        return acts[-1] if acts else None

    def label(self, index):
        return words.site_words(self.sites[index])

    def counts_words(self, obj):
        parts = [
            "%d %s" % (int(obj.get(k, 0) or 0), w)
            for k, w in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
            if obj.get(k)
        ]
        return ", ".join(parts) or "non-finite"


class Finding:
    """One cause that fires: a score in [0, 1] (how likely, for ranking), the evidence in
    words with its figures, the sites and steps it quotes."""

    def __init__(self, score, evidence, sites=(), steps=()):
        self.score = float(score)
        self.evidence = evidence
        self.sites = list(sites)
        self.steps = sorted({int(s) for s in steps})


def _steady_growth(values, steps):
    """(total ratio, steadiness, per-step rate, i_first, i_last) of a positive series, or None
    when it has fewer than 4 measured points.  Steadiness: the larger of R^2 of log norm against
    step (an unstable SGD oscillates while its amplitude grows) and the fraction of growing steps."""
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 4:
        return None
    # From the lowest point before the peak: the growth that led to the blow-up, not the steps
    # before it started (a warm-up, a schedule that grows).
    at = np.nonzero(keep)[0]
    rising = values[at][: int(np.argmax(values[at])) + 1][::-1]
    start = at[len(rising) - 1 - int(np.argmin(rising))]  # the last lowest point
    keep[:start] = False
    if keep.sum() < 4:
        return None
    v, t = values[keep], steps[keep]
    ratio = v[-1] / v[0]
    logs = np.log(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        growing = (
            float(np.corrcoef(t, logs)[0, 1] ** 2) if np.ptp(logs) > 0 and np.ptp(t) > 0 else 0.0
        )
    growing = growing if np.isfinite(growing) and logs[-1] > logs[0] else 0.0
    # Faster than geometric (log norm convex, as a diverging SGD accelerates) fits a line badly
    # but rises at nearly every step.
    growing = max(growing, float(np.mean(np.diff(v) > 0)))
    span = max(int(t[-1] - t[0]), 1)
    rate = ratio ** (1.0 / span) if ratio > 0 else 0.0
    idx = np.nonzero(keep)[0]
    return ratio, growing, rate, idx[0], idx[-1]


def rule_nonfinite_input(ev):
    if ev.producer is None or ev.sites[ev.producer]["kind"] != "input":
        return None
    return Finding(
        1.0,
        "%s held %s at step %d, before any layer ran: the data itself is not finite"
        % (ev.label(ev.producer), ev.counts_words(ev.first), ev.until),
        [ev.producer],
        [ev.until],
    )


def rule_nonfinite_target(ev):
    if ev.producer is None or ev.sites[ev.producer]["kind"] not in ("target", "sample_weight"):
        return None
    what = "labels" if ev.sites[ev.producer]["kind"] == "target" else "sample weights"
    return Finding(
        1.0,
        "%s held %s at step %d, before the loss used it: the %s of that batch are not finite"
        % (ev.label(ev.producer), ev.counts_words(ev.first), ev.until, what),
        [ev.producer],
        [ev.until],
    )


def rule_unscaled_inputs(ev):
    inputs = ev.indices("input")
    if (
        not inputs
        or ev.first is None
        or ev.sites[ev.producer if ev.producer is not None else 0]["kind"] == "input"
    ):
        return None
    max_abs = ev.finite_before("max_abs")[:, inputs]
    if not np.isfinite(max_abs).any():
        return None
    i, j = np.unravel_index(np.nanargmax(max_abs), max_abs.shape)
    biggest = max_abs[i, j]
    if not biggest > INPUT_SCALE:
        return None
    site = inputs[j]
    std = ev.col("std")[i, site]
    std_text = "" if not np.isfinite(std) else ", std %s" % _g(std)
    return Finding(
        min(0.95, 0.4 + 0.06 * math.log10(biggest)),
        "%s: largest |x| %s at step %d%s; standardised inputs stay within about +-5"
        % (ev.label(site), _g(biggest), ev.steps[i], std_text),
        [site],
        [ev.steps[i]],
    )


def rule_unscaled_targets(ev):
    loss = ev.loss_site()
    if ev.first is None or loss is None or not len(ev.steps):
        return None
    for out in ev.output_sites():  # a multi-output model: each head and its targets
        found = _unscaled_targets_at(ev, loss, out)
        if found is not None:
            return found
    return None


def _unscaled_targets_at(ev, loss, out):
    start = ev.steps[0]
    out_abs = ev.col("max_abs")[0, out]
    loss_value = ev.col("max_abs")[0, loss]
    if ev.nonfinite()[0, out] or not np.isfinite(out_abs):
        return None
    overflowed = (
        ev.producer == loss
        and ev.until == start
        and ev.first.get("posinf", 0)
        and not ev.first.get("nan", 0)
        and not ev.first.get("neginf", 0)
    )
    if overflowed:
        limit = largest_value(ev.sites[loss])
        if not out_abs < OUTPUT_VS_LOSS * math.sqrt(limit) or not _targets_can_make(ev, limit):
            return None  # the output overflows the loss by itself, or the targets are small
        return Finding(
            0.9,
            "the loss overflowed to +Inf at step %d, the first step, while the model's output "
            "(%s) was at most %s in magnitude: the targets are beyond %s"
            % (start, ev.label(out), _g(out_abs), _g(math.sqrt(limit)))
            + _measured_targets(ev),
            [loss, out],
            [start],
        )
    if (
        ev.nonfinite()[0, loss]
        or not (loss_value > HUGE_LOSS)
        or not (out_abs < OUTPUT_VS_LOSS * math.sqrt(loss_value))
        or not _targets_can_make(ev, loss_value)
    ):
        return None
    # Targets pull on the output: its gradient is large (a loss summed over many terms, with no
    # targets at all, is large too, but its gradient is not).
    pull = [
        i for i in ev.indices("activation_grad") if ev.sites[i]["layer"] == ev.sites[out]["layer"]
    ]
    if not pull or not ev.col("max_abs")[0, pull[0]] > 1.0:
        return None
    text = (
        "the loss was %s at step %d while the model's output (%s) was at most %s in magnitude: "
        "the targets are about %s"
        % (_g(loss_value), start, ev.label(out), _g(out_abs), _g(math.sqrt(loss_value)))
    )
    return Finding(0.9, text + _measured_targets(ev), [loss, out], [start])


def _largest_target(ev):
    """(largest |y| of the watched targets at the first logged step, its site), or None when the
    logs do not watch targets."""
    found = [(ev.col("max_abs")[0, i], i) for i in ev.indices("target") if ev.col("size")[0, i] > 0]
    found = [(v, i) for v, i in found if np.isfinite(v)]
    return max(found) if found else None


def _targets_can_make(ev, loss_value):
    """False when the watched targets are too small to make a loss of `loss_value` (a squared
    error needs |y| of about sqrt(loss)); True when they can, or are not watched."""
    largest = _largest_target(ev)
    return largest is None or largest[0] >= OUTPUT_VS_LOSS * math.sqrt(loss_value)


def _measured_targets(ev):
    """'; measured: ... largest |y| ...' from the target sites at the first logged step (logs that
    watch targets), else ''."""
    largest = _largest_target(ev)
    if largest is None:
        return ""
    value, site = largest
    return "; measured: %s has largest |y| %s at step %d" % (ev.label(site), _g(value), ev.steps[0])


def rule_large_initial_weights(ev):
    if ev.first is None or not len(ev.steps):
        return None
    best = None
    # Weights are logged after the step's update, and a huge first gradient makes even sane
    # weights huge; a layer's output at the first step was computed before the update, so its
    # gain over its input shows the initial weights.
    for site in ev.indices("weight", multiplying_only=True):
        if stats.weight_role(ev.sites[site]) not in ("kernel", "matrix"):
            continue  # the gain of a layer's output over its input is a kernel's doing
        gain = _first_step_gain(ev, ev.sites[site]["layer"])
        if gain is not None and gain > INIT_GAIN and (best is None or gain > best[0]):
            best = (gain, site)
    if best is not None:
        gain, site = best
        return Finding(
            min(0.9, 0.6 + 0.1 * math.log10(gain)),
            "%s's output at step %d, computed before the first update, has %sx the RMS of its input "
            "(with He or Glorot initial weights a layer keeps it near 1)"
            % (ev.sites[site]["layer"], ev.steps[0], _g(gain)),
            [site],
            [ev.steps[0]],
        )
    for site in ev.indices("weight", multiplying_only=True):
        expected = _initial_scale(ev.sites[site])
        if expected is None:
            continue
        he = expected[0]
        initial = _initial_rms(ev, site)
        limit = _init_limit(ev.sites[site])
        if initial is not None:  # the weights as training started: no first update to tell apart
            if initial > limit * he and (best is None or initial / he > best[0]):
                best = (initial / he, site, initial, he, None)
            continue
        norm, size = ev.col("norm")[0, site], ev.col("size")[0, site]
        rms = (
            norm / math.sqrt(size)
            if np.isfinite(norm) and size > 0
            else math.hypot(ev.col("std")[0, site], ev.col("mean")[0, site])
        )
        if not (np.isfinite(rms) and rms > limit * he):
            continue
        # Weights are logged after the step's update; the layer's output at the first step was
        # computed before it, so a large gain there shows the initial weights, not a wild first update.
        gain = _first_step_gain(ev, ev.sites[site]["layer"])
        if gain is not None and gain < max(INIT_RATIO, rms / he) / 4:
            continue
        if best is None or rms / he > best[0]:
            best = (rms / he, site, rms, he, gain)
    if best is None:
        return None
    ratio, site, rms, he, gain = best
    steps = _time_steps(ev, site) if stats.weight_role(ev.sites[site]) == "recurrent_kernel" else 1
    text = "%s (%s): RMS %s %s, %sx %s = %s" % (
        ev.label(site),
        stats.WEIGHT_ROLES[stats.weight_role(ev.sites[site])].split(":")[0],
        _g(rms),
        "as training started, before the first update"
        if _initial_rms(ev, site) is not None
        else "at step %d" % ev.steps[0],
        _g(ratio),
        _initial_scale(ev.sites[site])[1],
        _g(he),
    )
    if gain is not None:
        text += "; the layer's output at that step is %sx the RMS of its input" % _g(gain)
    if steps > 1:
        text += "; it is applied at each of the %d time steps, so the excess compounds" % steps
    # A recurrent kernel multiplies the state once per time step: its excess counts that often.
    # Read from the initial record, the scale is a fact, not inferred from updated weights.
    score = 0.5 + 0.1 * math.log10(ratio) * steps
    score += INITIAL_FACT if _initial_rms(ev, site) is not None else 0.0
    return Finding(min(0.9, score), text, [site], [ev.steps[0]])


def _init_limit(site):
    """How many times its role's scale a weight may start at: a recurrent kernel's excess
    compounds once per time step, so it gets less."""
    return RECURRENT_INIT_RATIO if stats.weight_role(site) == "recurrent_kernel" else INIT_RATIO


def _time_steps(ev, site):
    """The sequence length a recurrent kernel runs over: the time axis of the input of the layer
    that owns its cell (the site before that layer's output, [batch, time, features]), or 1."""
    _, prev = _cell_output(ev, site)
    shape = ev.sites[prev].get("shape") or [] if prev is not None else []
    return int(shape[1]) if len(shape) == 3 and shape[1] and shape[1] > 1 else 1


def _cell_output(ev, site):
    """(the output site of the layer that owns weight `site`'s cell, the input or activation
    site before it); (None, None) when the layer's output is not watched."""
    layer = ev.sites[site]["layer"]
    outer = (layer, layer.rpartition("/")[0])
    out = [i for i in ev.indices("activation") if ev.sites[i]["layer"] in outer]
    if not out:
        return None, None
    prev = [i for i in range(out[0]) if ev.sites[i]["kind"] in ("input", "activation")]
    return out[0], prev[-1] if prev else None


def _initial_rms(ev, site):
    """RMS of a weight in the `initial` record (before step 0's update), or None when the logs
    have no such record or it does not measure the site."""
    initial = getattr(ev.data, "initial", None)
    if initial is None or site >= len(initial):
        return None
    col = stats.STAT_INDEX
    norm, size = initial[site, col["norm"]], initial[site, col["size"]]
    if not (np.isfinite(norm) and size > 0):
        return None
    return float(norm / math.sqrt(size))


def _rms(ev, row, site):
    norm, size = ev.col("norm")[row, site], ev.col("size")[row, site]
    if np.isfinite(norm) and size > 0:
        return norm / math.sqrt(size)
    return math.hypot(ev.col("std")[row, site], ev.col("mean")[row, site])


def _first_step_gain(ev, layer):
    """RMS of `layer`'s output over the RMS of the activation (or input) before it, at the first
    logged step, or None when either is not measured."""
    out = [i for i in ev.indices("activation") if ev.sites[i]["layer"] == layer]
    if not out or ev.nonfinite()[0, out[0]]:
        return None
    prev = [i for i in range(out[0]) if ev.sites[i]["kind"] in ("input", "activation")]
    if not prev or ev.nonfinite()[0, prev[-1]]:
        return None
    rms_in, rms_out = _rms(ev, 0, prev[-1]), _rms(ev, 0, out[0])
    if not (np.isfinite(rms_in) and np.isfinite(rms_out) and rms_in > 0):
        return None
    return rms_out / rms_in


def rule_reduced_precision_underflow(ev):
    found = []
    for p in precursors(ev.data, limit=0):
        if p["sign"] != "underflow":
            continue
        site = ev.data.site_index(p["layer"], p["kind"], p["tensor"])
        if (
            ev.until is not None
            and site is not None
            and not (
                p["step"] < ev.until
                or (p["step"] == ev.until and ev.producer is not None and site < ev.producer)
            )
        ):
            continue
        found.append((p, site))
    if not found:
        return None
    text = "; ".join("step %d: %s" % (p["step"], p["text"]) for p, _ in found[:3])
    if len(found) > 3:
        text += "; and %d more" % (len(found) - 3)
    if ev.first is not None:
        text += "; then the first non-finite value at step %d" % ev.until
    return Finding(
        0.95 if ev.first is not None else 0.6,
        text,
        [s for _, s in found if s is not None],
        [p["step"] for p, _ in found],
    )


def _layer_op_types(ev, layer):
    """{op type: count} the run's op inventory (nanwatch_ops.json) holds for `layer`, or {}."""
    if not ev.data.run_dir:
        return {}
    try:
        record = op_sources.read_op_sources(ev.data.run_dir)
    except op_sources.OpSourcesError:
        return {}  # the report says the file is damaged (failing_step.facts)
    layers = (record or {}).get("layers") or {}
    return (layers.get(layer) or {}).get("op_types") or {}


def _half_overflow_op(ev):
    """The op type that overflows first in the half-precision layer whose output is the NaN
    producer (from the op inventory), or None."""
    if ev.producer is None:
        return None
    site = ev.sites[ev.producer]
    if site["kind"] != "activation" or site.get("dtype") not in _HALF or not ev.first.get("nan"):
        return None
    ops = _layer_op_types(ev, site["layer"])
    found = [op for op in OVERFLOWING_OPS if ops.get(op)]
    return found[0] if found else None


def rule_reduced_precision_overflow(ev):
    if ev.producer is None:
        return None
    site = ev.sites[ev.producer]
    op = _half_overflow_op(ev)
    if op is not None:
        return Finding(
            0.85,
            "%s (%s) went %s at step %d, and the layer computes %s, an op that overflows %s "
            "(largest finite value %s) before anything else in it: Inf / Inf or Inf - Inf made "
            "the NaN"
            % (
                ev.label(ev.producer),
                site["dtype"],
                ev.counts_words(ev.first),
                ev.until,
                op,
                site["dtype"],
                _g(dtype_limits(site["dtype"])[0]),
            ),
            [ev.producer],
            [ev.until],
        )
    if site.get("dtype") not in _HALF or not (ev.first.get("posinf") or ev.first.get("neginf")):
        return None
    limit = dtype_limits(site["dtype"])[0]
    text = "%s (%s) went %s at step %d; %s's largest finite value is %s" % (
        ev.label(ev.producer),
        site["dtype"],
        ev.counts_words(ev.first),
        ev.until,
        site["dtype"],
        _g(limit),
    )
    prev = ev.finite_before("max_abs")[:, ev.producer]
    if np.isfinite(prev).any():
        i = np.nonzero(np.isfinite(prev))[0][-1]
        text += " (its largest |x| was %s at step %d)" % (_g(prev[i]), ev.steps[i])
    return Finding(0.85, text, [ev.producer], [ev.until])


def rule_unstable_loss(ev):
    loss = ev.loss_site()
    if ev.producer is None or ev.producer != loss:
        return None
    out = ev.output_site()
    if ev.first.get("nan") or ev.first.get("neginf"):
        score = 0.8
    else:
        before = ev.finite_before("max_abs")[:, loss]
        if np.nanmax(before, initial=0.0) > HUGE_LOSS:
            return None  # a huge loss that grew into +Inf: targets or divergence, not the loss's formula
        if out is not None and ev.at(ev.until, "max_abs", out) >= OVERFLOWED_OUTPUT:
            return None  # the output itself is huge: any loss of it overflows
        score = 0.6
    text = "the loss went %s at step %d" % (ev.counts_words(ev.first), ev.until)
    sites = [loss]
    if out is not None:
        lo, hi = ev.at(ev.until, "min", out), ev.at(ev.until, "max", out)
        zeros = ev.at(ev.until, "zero_frac", out)
        if np.isfinite(lo) and np.isfinite(hi):
            text += " while the model's output (%s) was finite, in [%s, %s]" % (
                ev.label(out),
                _g(lo),
                _g(hi),
            )
            if np.isfinite(zeros) and zeros > 0:
                text += ", %.0f%% of it exactly 0" % (100 * zeros)
            sites.append(out)
    return Finding(score, text, sites, [ev.until])


def rule_domain_error(ev):
    if ev.producer is None:
        return None
    site = ev.sites[ev.producer]
    if site["kind"] not in ("activation", "activation_grad", "weight_grad"):
        return None
    if ev.first.get("posinf") and site.get("dtype") in _HALF:
        return None  # reduced_precision_overflow
    if _half_overflow_op(ev) is not None:
        return None  # a half-precision layer that overflows first: Inf / Inf made the NaN
    if any(out == ev.producer for _, out, _ in _recurrent_layers(ev)) and ev.finding(
        "recurrent_explosion"
    ):
        return None  # a recurrent state that exploded through time: Inf - Inf made the NaN
    headroom = ev.finite_before("headroom")[:, ev.producer]
    measured = headroom[np.isfinite(headroom)]
    if len(measured) and measured[-1] <= DOMAIN_HEADROOM:
        return None  # it was close to overflowing: growth, not a domain error
    feeding = [i for i in range(ev.producer) if ev.sites[i]["kind"] in ("input", "activation")]
    if (
        site["kind"] == "activation"
        and feeding
        and not ev.at(ev.until, "max_abs", feeding[-1]) < DOMAIN_INPUT
    ):
        return None  # a huge input times the weights overflows (and inf - inf makes NaN): not a domain error
    score = 0.8 if (ev.first.get("nan") or ev.first.get("neginf")) else 0.6
    what = "%s went %s at step %d" % (ev.label(ev.producer), ev.counts_words(ev.first), ev.until)
    earlier = [
        i for i in range(ev.producer) if ev.sites[i]["kind"] in ("input", "activation", "loss")
    ]
    if site["kind"] == "activation":
        prev = [i for i in earlier if ev.sites[i]["kind"] in ("input", "activation")]
        text = what + " while everything before it was finite"
        if prev:
            lo, hi = ev.at(ev.until, "min", prev[-1]), ev.at(ev.until, "max", prev[-1])
            if np.isfinite(lo) and np.isfinite(hi):
                text += " (its input, %s, in [%s, %s])" % (ev.label(prev[-1]), _g(lo), _g(hi))
    elif site["kind"] == "weight_grad":
        text = what + (
            " while the loss and every gradient before it were finite: an op of %s has an "
            "undefined gradient w.r.t. this weight there (e.g. sqrt or tf.norm of a difference "
            "that is 0)" % site["layer"]
        )
    else:
        text = (
            what
            + " while the loss and every activation were finite: the backward pass of an op after it"
        )
        by = [b for b in ev.first.get("backward_of") or [] if b]
        if by:
            text += " (%s)" % ", ".join(by)
        text += " has an undefined gradient there"
    return Finding(score, text, [ev.producer], [ev.until])


def _kernel_growth(ev, kind):
    """The steadiest geometric growth of a kernel's norm before the first non-finite step."""
    norms = ev.finite_before("norm")
    best = None
    for site in ev.indices(kind, multiplying_only=True):
        grown = _steady_growth(norms[:, site], ev.steps)
        if grown and (best is None or grown[0] > best[0][0]):
            best = (grown, site)
    return best


def rule_learning_rate_too_high(ev):
    if ev.first is None:
        return None
    best = _kernel_growth(ev, "weight")
    if best is None:
        return None
    (ratio, growing, rate, i, j), site = best
    if not (ratio >= GROWTH_TOTAL and growing >= GROWTH_STEADY and rate >= GROWTH_RATE):
        return None
    norms = ev.col("norm")[:, site]
    return Finding(
        0.75,
        "%s: L2 norm grew from %s at step %d to %s at step %d (x%.3g a step, steadiness %.2f)"
        % (ev.label(site), _g(norms[i]), ev.steps[i], _g(norms[j]), ev.steps[j], rate, growing),
        [site],
        [ev.steps[i], ev.steps[j]],
    )


def rule_exploding_gradients(ev):
    if ev.first is None:
        return None
    grads = ev.indices("activation_grad")  # backward order: last layer first
    norms = ev.finite_before("norm")
    if len(grads) >= 3:
        measured = np.nonzero(
            np.isfinite(norms[:, grads]).all(axis=1) & (norms[:, grads] > 0).all(axis=1)
        )[0]
        # The output's gradient: the heads' (of a multi-output model) largest, else the
        # first in backward order.
        heads = {ev.sites[i]["layer"] for i in ev.output_sites()}
        outputs = [i for i in grads if ev.sites[i]["layer"] in heads] or grads[:1]
        first = grads[-1]
        # At the first measured step the weights are as initialised: gradients that multiply
        # through the layers there explode by depth (a root cause, unless the initial weights
        # are too large, which is large_initial_weights'); at the last finite step weights that
        # grew may be what multiplies them (a symptom, ranked lower).
        at_start = 0.8 if ev.finding("large_initial_weights") is None else 0.6
        for i, score, when in (
            (measured[:1], at_start, ", before the weights could grow,"),
            (measured[-1:], 0.6, ""),
        ):
            if not len(i):
                continue
            i = i[0]
            last = outputs[int(np.argmax(norms[i, outputs]))]
            ratio = norms[i, first] / norms[i, last]
            if ratio > GRADIENT_DEPTH_RATIO:
                return Finding(
                    score,
                    "at step %d%s the norm of %s is %s, %sx that of %s (%s): gradients "
                    "multiply backward through %d layers"
                    % (
                        ev.steps[i],
                        when,
                        ev.label(first),
                        _g(norms[i, first]),
                        _g(ratio),
                        ev.label(last),
                        _g(norms[i, last]),
                        len(grads),
                    ),
                    [first, last],
                    [ev.steps[i]],
                )
    best = _kernel_growth(ev, "weight_grad")
    grown = best is not None and best[0][0] >= GRADIENT_GROWTH and best[0][1] >= GROWTH_STEADY
    if not grown:
        return _update_jump(ev)
    (ratio, growing, rate, i, j), site = best
    weights = _kernel_growth(ev, "weight")
    weights_grew = weights is not None and weights[0][0] >= GROWTH_TOTAL
    g = ev.col("norm")[:, site]
    return Finding(
        0.5 if weights_grew else 0.65,
        "%s: norm grew from %s at step %d to %s at step %d (x%.2f a step)%s"
        % (
            ev.label(site),
            _g(g[i]),
            ev.steps[i],
            _g(g[j]),
            ev.steps[j],
            rate,
            "; the weights grew with it" if weights_grew else ", while the weights did not",
        ),
        [site],
        [ev.steps[i], ev.steps[j]],
    )


def _update_jump(ev):
    """A Finding when one update multiplied a multiplying weight's norm by UPDATE_JUMP or more
    (before the first non-finite step), from the initial record or the row of the step before."""
    norms = ev.finite_before("norm")
    initial = getattr(ev.data, "initial", None)
    col = stats.STAT_INDEX
    best = None
    for site in ev.indices("weight", multiplying_only=True):
        before = []  # (norm before the update, where it was read, the step after it)
        if initial is not None and site < len(initial) and len(ev.steps) and ev.steps[0] == 0:
            before.append((initial[site, col["norm"]], "as training started", 0))
        for i in range(1, len(ev.steps)):
            if ev.steps[i] == ev.steps[i - 1] + 1:
                before.append((norms[i - 1, site], "at step %d" % ev.steps[i - 1], i))
        for was, when, i in before:
            now = norms[i, site]
            if not (np.isfinite(was) and was > 0 and np.isfinite(now)):
                continue
            if now / was >= UPDATE_JUMP and (best is None or now / was > best[0]):
                best = (now / was, site, was, when, i)
    if best is None:
        return None
    jump, site, was, when, i = best
    grad = ev.gradient_of(site)
    text = "one update multiplied the norm of %s by %s: from %s %s to %s at step %d" % (
        ev.label(site),
        _g(jump),
        _g(was),
        when,
        _g(norms[i, site]),
        ev.steps[i],
    )
    sites = [site]
    if grad is not None and np.isfinite(ev.col("norm")[i, grad]):
        text += "; its gradient's norm was %s" % _g(ev.col("norm")[i, grad])
        sites.append(grad)
    return Finding(0.6, text, sites, [ev.steps[i]])


def _recurrent_layers(ev):
    """[(recurrent kernel site, the layer's output site, the site before it)] of the run."""
    found = []
    for site in ev.indices("weight"):
        if stats.weight_role(ev.sites[site]) != "recurrent_kernel":
            continue
        out, prev = _cell_output(ev, site)
        if out is not None:
            found.append((site, out, prev))
    return found


def _gain(rms, site):
    """A recurrent kernel's gain: its RMS x sqrt(units), about its spectral radius (1 for an
    orthogonal matrix)."""
    shape = site.get("shape") or []
    return rms * math.sqrt(shape[-1]) if shape else float("nan")


def rule_recurrent_explosion(ev):
    if ev.first is None:
        return None
    max_abs = ev.col("max_abs")
    nonfinite = ev.nonfinite()
    best = None
    rows = np.nonzero(ev.steps <= ev.until)[0]
    for kernel, out, prev in _recurrent_layers(ev):
        # Where the state first exploded: the producer, or a row before the blow-up whose output
        # is RECURRENT_STATE x its input.
        for i in rows:
            inp = max_abs[i, prev] if prev is not None else float("nan")
            if not (np.isfinite(inp) and not nonfinite[i, prev]):
                continue
            exploded = ev.producer == out and ev.steps[i] == ev.until
            ratio = max_abs[i, out] / max(inp, 1e-12)
            if exploded or (not nonfinite[i, out] and ratio > RECURRENT_STATE):
                if best is None or ev.steps[i] < ev.steps[best[3]]:
                    best = (kernel, out, prev, i, exploded)
                break
    if best is None:
        return None
    kernel, out, prev, i, exploded = best
    site = ev.sites[kernel]
    text = "%s %s at step %d while its input (%s) was at most %s" % (
        ev.label(out),
        "went %s" % ev.counts_words(ev.first)
        if exploded
        else "reached |h| %s" % _g(max_abs[i, out]),
        ev.steps[i],
        ev.label(prev),
        _g(max_abs[i, prev]),
    )
    steps = _time_steps(ev, kernel)
    if steps > 1:
        text += ", over %d time steps" % steps
    initial = _initial_rms(ev, kernel)
    sane = True
    if initial is not None:
        gain = _gain(initial, site)
        text += "; the recurrent kernel's gain (RMS x sqrt(units)) was %s as training started" % _g(
            gain
        )
        scale = _initial_scale(site)
        sane = scale is None or initial <= _init_limit(site) * scale[0]
    last = np.nonzero(np.isfinite(ev.finite_before("norm")[:, kernel]))[0]
    if len(last):
        rms = _rms(ev, last[-1], kernel)
        text += "%s %s at step %d" % (
            " and"
            if initial is not None
            else "; the recurrent kernel's gain (RMS x sqrt(units)) was",
            _g(_gain(rms, site)),
            ev.steps[last[-1]],
        )
    # A kernel that started far too large is large_initial_weights' finding; this one explains
    # how it blew up.
    # Keras' recurrent cells compute nothing outside their domain: a NaN out of one whose state
    # exploded is Inf - Inf, so this outranks a domain error at the same layer.
    score = (0.85 if ev.producer == out else 0.8) if sane else 0.55
    return Finding(score, text, [out, kernel], [ev.steps[i]])


def _slot_without_overflow(ev):
    """(slot site, its gradient site, largest |g|) when the producer is an optimizer slot that
    went NaN, no Inf, while its weight's gradient was finite with g^2 far below the dtype's
    largest value: nothing overflowed, so the update divided 0 by 0; else None."""
    if ev.producer is None:
        return None
    site = ev.sites[ev.producer]
    if site["kind"] != "optimizer_state" or not ev.first.get("nan"):
        return None
    if ev.first.get("posinf") or ev.first.get("neginf"):
        return None
    grad = ev.gradient_of(ev.producer)
    if grad is None:
        return None
    g = ev.at(ev.until, "max_abs", grad)
    if not (np.isfinite(g) and g * g < largest_value(site)):
        return None
    return ev.producer, grad, g


def rule_optimizer_zero_division(ev):
    if ev.producer is None:
        return None
    site = ev.sites[ev.producer]
    in_slot = _slot_without_overflow(ev)
    if in_slot is not None:
        slot, grad, g = in_slot
        return Finding(
            0.8,
            "%s went %s at step %d while its gradient (%s) was finite, largest |g| %s, far "
            "from overflowing: the update divided 0 by 0 (an epsilon of 0 where the gradient "
            "and the slots are 0)"
            % (ev.label(slot), ev.counts_words(ev.first), ev.until, ev.label(grad), _g(g)),
            [slot, grad],
            [ev.until],
        )
    if site["kind"] != "weight" or not ev.first.get("nan") or ev.first.get("posinf"):
        return None
    grad = ev.gradient_of(ev.producer)
    if grad is None or not np.isfinite(ev.at(ev.until, "max_abs", grad)):
        return None
    slots = ev.slots_of(ev.producer)
    if any(not np.isfinite(ev.at(ev.until, "max_abs", i)) for i in slots):
        return None
    zeros = ev.at(ev.until, "zero_frac", grad)
    text = "%s went %s at step %d, at its update, while its gradient%s were finite" % (
        ev.label(ev.producer),
        ev.counts_words(ev.first),
        ev.until,
        " and its optimizer slots" if slots else "",
    )
    size = int(np.prod(site.get("shape") or [0]))
    if np.isfinite(zeros) and zeros > 0:
        text += (
            "; %.0f%% of the gradient was exactly 0 at that step (m / sqrt(v) = 0 / 0 there)"
            % (100 * zeros)
        )
    elif size > 0:  # a step's sampled statistics can be lost with it: the count is kept
        text += "; %d of its %d elements: those whose gradient and slots were 0 (0 / 0)" % (
            int(ev.first.get("nan", 0)),
            size,
        )
    return Finding(0.85 if slots else 0.7, text, [ev.producer, grad] + slots, [ev.until])


def rule_optimizer_state_overflow(ev):
    if ev.producer is None or _slot_without_overflow(ev) is not None:
        return None  # a NaN slot with a small gradient: optimizer_zero_division
    site = ev.sites[ev.producer]
    if site["kind"] != "optimizer_state" or not (ev.first.get("posinf") or ev.first.get("nan")):
        return None
    grad = ev.gradient_of(ev.producer)
    text = "%s went %s at step %d" % (ev.label(ev.producer), ev.counts_words(ev.first), ev.until)
    sites = [ev.producer]
    limit = largest_value(site)
    if grad is not None:
        g = ev.at(ev.until, "max_abs", grad)
        if np.isfinite(g):
            text += " while its gradient (%s) was finite, largest |g| %s" % (ev.label(grad), _g(g))
            if g * g > limit:
                text += ": g^2 = %s passes %s's largest value %s" % (
                    _g(g * g),
                    site.get("dtype", "float32"),
                    _g(limit),
                )
            sites.append(grad)
    return Finding(0.7, text, sites, [ev.until])


def rule_loss_scale_collapse(ev):
    collapses = [e for e in ev.events if e.get("type") == "loss_scale_collapse"]
    if not collapses:
        return None
    e = collapses[0]
    scale = e.get("loss_scale")
    text = "the loss scale fell to %s at step %s (%d collapse event%s)" % (
        "?" if scale is None else _g(scale),
        e.get("step", "?"),
        len(collapses),
        "" if len(collapses) == 1 else "s",
    )
    sites, steps = [], [e["step"]] if isinstance(e.get("step"), int) else []
    # The half-precision gradient that came closest to its dtype's largest value (statistics are
    # of the unscaled gradients, so this is what overflows even at a scale of 1).
    halves = [
        i
        for i, site in enumerate(ev.sites)
        if site.get("dtype") in _HALF and site["kind"] in ("activation_grad", "weight_grad")
    ]
    if halves:
        headroom = ev.finite_before("headroom")[:, halves]
        if steps:  # what led to the collapse, not what came after
            headroom[ev.steps > steps[0]] = np.nan
        if np.isfinite(headroom).any():
            i, j = np.unravel_index(np.nanargmin(headroom), headroom.shape)
            text += (
                "; closest to overflowing: %s, %.1f doublings below %s's largest value at step %d"
                % (
                    ev.label(halves[j]),
                    max(headroom[i, j], 0.0),
                    ev.sites[halves[j]]["dtype"],
                    ev.steps[i],
                )
            )
            sites.append(halves[j])
            steps.append(ev.steps[i])
    return Finding(0.7, text, sites, steps)


def rule_vanishing_gradients(ev):
    zeros = ev.finite_before("zero_frac")
    out, loss = ev.output_site(), ev.loss_site()
    candidates = ev.indices("weight_grad", multiplying_only=True) + [
        i for i in ev.indices("activation") if i != out and (loss is None or i < loss)
    ]
    best = None
    for site in candidates:
        measured = np.isfinite(zeros[:, site]) & (ev.col("size")[:, site] > 0)
        dead = measured & (zeros[:, site] >= 1.0)
        n, total = int(dead.sum()), int(measured.sum())
        if (
            n >= VANISHED_ROWS
            and n >= VANISHED_FRACTION * total
            and (best is None or n / total > best[0])
        ):
            best = (n / total, site, n, total, np.nonzero(dead)[0][0])
    if best is None:
        return None
    _, site, n, total, i = best
    what = "gradient" if ev.sites[site]["kind"] == "weight_grad" else "output"
    return Finding(
        0.5,
        "%s: every element exactly 0 in %d of %d logged rows, from step %d (the %s is gone)"
        % (ev.label(site), n, total, ev.steps[i], what),
        [site],
        [ev.steps[i]],
    )


RULES = {
    "nonfinite_input": rule_nonfinite_input,
    "nonfinite_target": rule_nonfinite_target,
    "unscaled_inputs": rule_unscaled_inputs,
    "unscaled_targets": rule_unscaled_targets,
    "large_initial_weights": rule_large_initial_weights,
    "reduced_precision_underflow": rule_reduced_precision_underflow,
    "reduced_precision_overflow": rule_reduced_precision_overflow,
    "unstable_loss": rule_unstable_loss,
    "domain_error": rule_domain_error,
    "learning_rate_too_high": rule_learning_rate_too_high,
    "exploding_gradients": rule_exploding_gradients,
    "recurrent_explosion": rule_recurrent_explosion,
    "optimizer_state_overflow": rule_optimizer_state_overflow,
    "optimizer_zero_division": rule_optimizer_zero_division,
    "loss_scale_collapse": rule_loss_scale_collapse,
    "vanishing_gradients": rule_vanishing_gradients,
}


REMEDY_HELD = 0.1  # a cause's score when its remedy made the replayed step finite ...
REMEDY_FAILED = -0.2  # ... and when it did not


def _replay_of(ev, replay):
    """The replay's result for this run's first non-finite step (read from the run directory
    when not given), or None."""
    if replay is None and ev.data.run_dir:
        try:
            replay = failing_step.read_replay(ev.data.run_dir)
        except (OSError, ValueError):
            return None  # the report says the file is damaged (failing_step.facts)
    if not replay or ev.first is None or replay.get("step") != ev.until:
        return None
    return replay


def _replay_overflow(ev, replay):
    """A Finding when the replay's first non-finite op overflowed (+-Inf) in half precision:
    the logs may show only the NaN that inf / inf made of it, which reads as a domain error."""
    op = replay.get("op") or {}
    values = op.get("values") or []
    if op.get("dtype") not in _HALF or not ("+Inf" in values or "-Inf" in values):
        return None
    text = "on replay, op %s output %s in %s (largest finite value %s)" % (
        failing_step.op_words(op),
        " and ".join(v for v in values if v != "NaN"),
        op["dtype"],
        _g(dtype_limits(op["dtype"])[0]),
    )
    # A fact seen on the op itself; an underflow before it (rule_reduced_precision_underflow,
    # 0.95) is its root and stays above it.
    return Finding(0.9, text, [ev.producer] if ev.producer is not None else [], [ev.until])


def _with_replay(ev, replay, cause_id, finding):
    """The finding adjusted by what the replay found: an overflow in half precision ranks
    reduced_precision_overflow first and a domain error below it; a remedy of the cause that
    held raises it, one that did not lowers it."""
    overflow = _replay_overflow(ev, replay)
    if overflow is not None and cause_id == "reduced_precision_overflow":
        if finding is None or finding.score < overflow.score:
            finding = Finding(
                overflow.score,
                (finding.evidence + "; " if finding else "") + overflow.evidence,
                overflow.sites,
                overflow.steps,
            )
    if finding is None:
        return None
    if overflow is not None and cause_id == "domain_error":
        finding.score = min(finding.score, 0.5)
        finding.evidence += "; but on replay the op overflowed in %s" % replay["op"]["dtype"]
    trials = [
        t for t in replay.get("remedies") or [] if t.get("cause") == cause_id and t.get("applied")
    ]
    for trial in trials:
        finding.evidence += "; on replay, %s %s" % (
            trial.get("remedy"),
            "made the step finite" if trial.get("finite_after") else "did not make the step finite",
        )
    if trials:  # once per cause: one of its remedies held, or none did
        held = any(t.get("finite_after") for t in trials)
        # An overflow seen on the op is a fact; the variants a replay can apply (a layer's compute
        # dtype, not its variables') failing does not make it less of one.
        confirmed = overflow is not None and cause_id == "reduced_precision_overflow"
        if held or not confirmed:
            finding.score = min(
                1.0, max(0.0, finding.score + (REMEDY_HELD if held else REMEDY_FAILED))
            )
    return finding


def diagnose(run_data, replay=None):
    """[{cause, title, evidence, remedy, sites, steps, score}], most likely first; [] for a
    finite run with no warning sign.  `report --json`'s "diagnosis" and the tab's banner.
    What a replay of the failing step found (`replay`, else the run directory's
    nanwatch_replay.json) adjusts the ranking (`_with_replay`)."""
    ev = Evidence(run_data)
    replay = _replay_of(ev, replay)
    found = []
    for order, cause in enumerate(causes.CAUSES):
        if cause.blowup and ev.first is None:
            continue
        finding = ev.finding(cause.id)
        if replay is not None:
            finding = _with_replay(ev, replay, cause.id, finding)
        if finding is None:
            continue
        found.append(
            (
                -finding.score,
                order,
                dict(
                    cause=cause.id,
                    title=cause.title,
                    evidence=finding.evidence,
                    remedy=cause.remedy,
                    sites=[_site_json(ev.sites[s]) for s in finding.sites],
                    steps=finding.steps,
                    score=round(finding.score, 2),
                ),
            )
        )
    by_cause = {f["cause"]: i for i, (_, _, f) in enumerate(found)}
    under, over = (
        by_cause.get("reduced_precision_underflow"),
        by_cause.get("reduced_precision_overflow"),
    )
    if ev.first is not None and under is not None and over is not None:
        # An underflow before the blow-up is the root of the overflow it leads to (m / sqrt(v)
        # with v flushed to 0), however sure the replay made the overflow.
        key, order, finding = found[under]  # keys are -score: most likely first
        key = min(key, found[over][0] - 0.01)
        finding["score"] = round(-key, 2)
        found[under] = (key, order, finding)
    return [f for _, _, f in sorted(found, key=lambda x: x[:2])]
