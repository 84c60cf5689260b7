"""The one table of site kinds and statistics.

Writer, reader, plugin, CLI and frontend all take their names, meanings and
aggregation rules from here (the frontend receives it from the `/info` route),
so a statistic is added or renamed in exactly one place.

A logged *row* covers the training steps since the previous row.  Each statistic
says how the writer measures it (``measured``):

* ``every_step``: exact over every step of the row, accumulated by ``aggregate``.
  The writer reads each watched tensor once per step with an L2 norm (as cheap
  as a sum, and non-finite whenever any element is), so non-finite counts are
  computed exactly on the steps whose norm says so, and are zero on all others.
* ``last_step``: the value at the row's last step, measured at every step (so
  the flight recorder has it at every step too).
* ``sampled``: computed on the row's last step (and on the first non-finite
  step), over the *finite* elements only, so they stay meaningful when some are not.

``aggregate`` says how rows combine when several are merged into one heatmap
column or one report line: never by averaging away a NaN or an Inf.
"""

import collections

import numpy as np

# In the order they happen inside a training step.
KINDS = (
    "input",
    "target",  # what the loss compares the output with (labels), one site per leaf
    "sample_weight",  # per-sample loss weights (class_weight becomes these), one per leaf
    "activation",  # a layer's output, forward order
    "loss",
    "activation_grad",  # gradient w.r.t. a layer's output, backward order
    "weight_grad",
    "optimizer_state",  # every slot the optimizer keeps, per variable
    "weight",  # after the update
)

KIND_MEANINGS = {
    "input": "the batch fed to the model",
    "target": "the targets (labels) of the batch, as the loss receives them",
    "sample_weight": "the batch's sample weights (from sample_weight= or class_weight=)",
    "activation": "a layer's output",
    "loss": "the training loss",
    "activation_grad": "gradient of the loss w.r.t. a layer's output",
    "weight_grad": "gradient of the loss w.r.t. a weight",
    "optimizer_state": "a slot the optimizer keeps for a weight (e.g. Adam's velocity)",
    "weight": "a weight after the optimizer update",
}

# How the kinds read in words (tab, report, PNG), and the phase of a step each belongs to.
KIND_WORDS = {
    "input": "input",
    "target": "target",
    "sample_weight": "sample weight",
    "activation": "activation",
    "loss": "loss",
    "activation_grad": "activation gradient",
    "weight_grad": "weight gradient",
    "optimizer_state": "optimizer state",
    "weight": "weight",
}
# The writer files the loss (and, for a Keras model, its input) under the model's own name
# (e.g. "sequential"): a row of the heatmap that is not a layer.  The tab finds that row by
# this kind and explains it.
MODEL_ROW_KIND = "loss"
PHASES = {
    "input": "forward",
    "target": "forward",
    "sample_weight": "forward",
    "activation": "forward",
    "loss": "forward",
    "activation_grad": "backward",
    "weight_grad": "backward",
    "optimizer_state": "update",
    "weight": "update",
}


# What a weight is to its layer (a site's `role`, written with weight, weight_grad and
# optimizer_state sites), and the scale a rule expects of it as training starts.  The writer
# knows the role from the layer (`layer.embeddings is variable`); logs written before roles
# existed get it from the variable's name (see `weight_role`).
WEIGHT_ROLES = {
    "kernel": "a Dense/Conv/EinsumDense kernel: scale sqrt(2 / fan_in) (He)",
    "recurrent_kernel": "a recurrent layer's state-to-state kernel: scale sqrt(2 / units) (He)",
    "embedding": "an embedding table: rows of about unit scale at most",
    "norm_scale": "a normalisation layer's scale (gamma): 1 at the start",
    "norm_shift": "a normalisation layer's shift (beta)",
    "bias": "a bias",
    "matrix": "another weight of 2 or more dimensions (a custom add_weight): scale as a kernel",
    "vector": "another weight of fewer than 2 dimensions",
}
# Roles that multiply what flows through the layer: the rules on initial scale, growth and
# vanishing gradients read these.
MULTIPLYING_ROLES = ("kernel", "recurrent_kernel", "embedding", "matrix", "norm_scale")
_ROLE_BY_NAME = {
    "kernel": "kernel",
    "depthwise_kernel": "kernel",
    "pointwise_kernel": "kernel",
    "recurrent_kernel": "recurrent_kernel",
    "embeddings": "embedding",
    "gamma": "norm_scale",
    "beta": "norm_shift",
    "bias": "bias",
    "recurrent_bias": "bias",
}


def weight_role(site):
    """The role of a weight-related site: its `role` field, else from the variable's name (the
    last part of `tensor`: `velocity/embeddings` -> embedding) and its rank."""
    role = site.get("role")
    if isinstance(role, str) and role in WEIGHT_ROLES:
        return role
    name = str(site.get("tensor", "")).split("/")[-1]
    rank = len(site.get("shape") or ())
    role = _ROLE_BY_NAME.get(name)
    if role in ("kernel", "recurrent_kernel", "embedding") and rank < 2:
        role = None
    return role or ("matrix" if rank >= 2 else "vector")


def kind_words(kind):
    """`optimizer_state` -> `optimizer state`, `weight_grad` -> `weight gradient`."""
    return KIND_WORDS.get(kind, str(kind).replace("_", " "))


Stat = collections.namedtuple(
    "Stat", ["name", "meaning", "aggregate", "every_step", "scale", "measured", "loss_scaled"]
)
# aggregate:   how values of several rows combine: sum | min | max | mean (weighted by steps) | last
# every_step:  measured at every step (measured is every_step or last_step)
# scale:       how the frontend colours it: log (magnitudes), linear, or count
# measured:    every_step | last_step | sampled (see above)
# loss_scaled: in the tensor's units, so a gradient's value carries the loss scale (the
#              writer divides it out under a LossScaleOptimizer)


def _stat(name, meaning, aggregate, measured, scale, loss_scaled=False):
    return Stat(name, meaning, aggregate, measured != "sampled", scale, measured, loss_scaled)


STATS = (
    _stat("steps", "training steps this row covers", "sum", "every_step", "linear"),
    _stat(
        "size",
        "elements in the tensor (0: the site was not computed, e.g. off the gradient path)",
        "max",
        "every_step",
        "log",
    ),
    _stat("nan", "NaN elements, summed over every step of the row", "sum", "every_step", "count"),
    _stat(
        "posinf", "+Inf elements, summed over every step of the row", "sum", "every_step", "count"
    ),
    _stat(
        "neginf", "-Inf elements, summed over every step of the row", "sum", "every_step", "count"
    ),
    _stat(
        "nonfinite_steps",
        "steps of the row at which the site held a NaN or Inf",
        "sum",
        "every_step",
        "count",
    ),
    _stat(
        "first_nonfinite_step",
        "first step of the row at which the site held a NaN or Inf (NaN: none)",
        "min",
        "every_step",
        "linear",
    ),
    _stat(
        "norm",
        "L2 norm of the finite elements (row's last step; measured at every step)",
        "max",
        "last_step",
        "log",
        True,
    ),
    _stat(
        "max_norm",
        "largest per-step L2 norm of the finite elements over the row's steps",
        "max",
        "every_step",
        "log",
        True,
    ),
    _stat("min", "smallest finite element (row's last step)", "min", "sampled", "linear", True),
    _stat("max", "largest finite element (row's last step)", "max", "sampled", "linear", True),
    _stat(
        "mean", "mean of the finite elements (row's last step)", "mean", "sampled", "linear", True
    ),
    _stat(
        "std",
        "standard deviation of the finite elements (row's last step)",
        "max",
        "sampled",
        "log",
        True,
    ),
    _stat(
        "max_abs",
        "largest |x| of the finite elements (row's last step)",
        "max",
        "sampled",
        "log",
        True,
    ),
    _stat(
        "zero_frac", "fraction of elements exactly 0 (row's last step)", "max", "sampled", "linear"
    ),
    _stat(
        "headroom",
        "log2(largest finite value of the dtype / max_abs): doublings left before overflow",
        "min",
        "sampled",
        "linear",
    ),
    _stat(
        "underflow_frac",
        "float16/bfloat16 only: fraction of elements below the smallest normal, zeros included",
        "max",
        "sampled",
        "linear",
    ),
)

STAT_NAMES = tuple(s.name for s in STATS)
STAT_INDEX = {s.name: i for i, s in enumerate(STATS)}
STATS_BY_NAME = {s.name: s for s in STATS}
NONFINITE_STATS = ("nan", "posinf", "neginf")
# The writer's columns, derived from the table: what the full-statistics branch computes,
# and what the loss scale is divided out of for gradients.
SAMPLED_STATS = tuple(s.name for s in STATS if s.measured == "sampled")
LOSS_SCALED_STATS = tuple(s.name for s in STATS if s.loss_scaled)
# Kinds that are gradients: under a LossScaleOptimizer they carry the loss scale, and a step
# whose only non-finite sites are gradients is a skipped step, not the blow-up.
GRADIENT_KINDS = ("activation_grad", "weight_grad")


# Combining the sites of one layer (or group) into one heatmap row: the rules over steps
# hold for every statistic but these, which count per tensor, not per step.
ACROSS_SITES = {"steps": "max", "size": "sum", "nonfinite_steps": "max"}


def aggregate(rows, starts=(0,), axis=0, stat_indices=None, rules=None):
    """Combines consecutive slices of `rows` ([..., n_stats] arrays in table order) by the
    table's rules: slice j is [starts[j], starts[j+1]) along `axis` (the last runs to the
    end), as `np.add.reduceat` cuts them.  The one implementation of the rules: heatmap
    columns (rows over steps), layer rows (sites over a layer) and report lines use it.

    NaN means "not measured" and is skipped; a slice where every value is NaN stays NaN.
    `stat_indices`: only these statistics are computed (the others stay NaN), so a view
    of a big run costs what its answer costs.  `rules`: {stat name: rule} overriding the
    table's (e.g. ACROSS_SITES).  Returns the array with `axis` of length len(starts).
    """
    rows = np.moveaxis(np.asarray(rows, dtype=np.float64), axis, 0)
    starts = np.asarray(starts, dtype=np.intp)
    out = np.full((len(starts),) + rows.shape[1:], np.nan)
    if not len(starts) or not len(rows):
        return np.moveaxis(out, 0, axis)
    steps = rows[..., STAT_INDEX["steps"]]
    for k in range(len(STATS)) if stat_indices is None else stat_indices:
        rule = (rules or {}).get(STATS[k].name, STATS[k].aggregate)
        col = rows[..., k]
        present = ~np.isnan(col)
        anyp = np.add.reduceat(present.astype(np.int64), starts, axis=0) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            if rule == "sum":
                val = np.add.reduceat(np.where(present, col, 0.0), starts, axis=0)
            elif rule == "min":
                val = np.minimum.reduceat(np.where(present, col, np.inf), starts, axis=0)
            elif rule == "max":
                val = np.maximum.reduceat(np.where(present, col, -np.inf), starts, axis=0)
            elif rule == "mean":  # weighted by the steps each value covers
                weight = np.where(present, np.nan_to_num(steps, nan=1.0), 0.0)
                val = np.add.reduceat(
                    np.where(present, col, 0.0) * weight, starts, axis=0
                ) / np.add.reduceat(weight, starts, axis=0)
            elif rule == "last":
                index = np.arange(len(col)).reshape((-1,) + (1,) * (col.ndim - 1))
                last = np.maximum.reduceat(np.where(present, index, -1), starts, axis=0)
                val = np.take_along_axis(col, np.maximum(last, 0), axis=0)
            else:  # pragma: no cover - the table is fixed above
                raise ValueError(rule)
        out[..., k] = np.where(anyp, val, np.nan)
    return np.moveaxis(out, 0, axis)


def aggregate_rows(rows, axis=0):
    """`aggregate` of the whole of `axis` into one: the axis disappears."""
    return np.take(aggregate(rows, (0,), axis), 0, axis=axis)


def nonfinite_status(row):
    """One code per site from a row ([..., n_stats]): 0 finite, 1 NaN, 2 +Inf, 3 -Inf,
    4 several kinds, 5 not computed (size 0 or missing).  Shared by heatmap, CLI and frontend."""
    row = np.asarray(row, dtype=np.float64)
    nan = np.nan_to_num(row[..., STAT_INDEX["nan"]]) > 0
    pos = np.nan_to_num(row[..., STAT_INDEX["posinf"]]) > 0
    neg = np.nan_to_num(row[..., STAT_INDEX["neginf"]]) > 0
    kinds = nan.astype(int) + pos.astype(int) + neg.astype(int)
    size = row[..., STAT_INDEX["size"]]
    status = np.zeros(row.shape[:-1], dtype=np.uint8)
    status[nan] = 1
    status[pos] = 2
    status[neg] = 3
    status[kinds > 1] = 4
    status[(kinds == 0) & ~(size > 0)] = 5
    return status


STATUS_NAMES = ("finite", "nan", "+inf", "-inf", "mixed", "absent")

# RGB of every status but "finite", for every heatmap: the tab (through `/info`) and
# `report --png`.  Finite cells take a light-to-dark blue ramp by value, so these are
# hues that ramp never has.  Chosen to stay apart for red/green colour-blind readers
# too: under simulated protanopia and deuteranopia (Machado et al. 2009) every pair,
# and each colour against every shade of the ramp and white, is at least 15 CIEDE2000
# apart (the old magenta/purple NaN fell onto the blue ramp for protans; a teal -Inf
# would too).  "mixed" also stays apart from FIRST_CELL_OUTLINE, the black frame around the
# first non-finite cell (the old near-black mixed was 6 CIEDE2000 from it, the dark rust
# 22; tests/test_colours.py measures both).
STATUS_COLOURS = {
    "nan": (200, 0, 90),  # raspberry magenta
    "+inf": (235, 95, 15),  # red-orange
    "-inf": (250, 225, 60),  # yellow
    "mixed": (100, 40, 0),  # dark rust: several of NaN, +Inf, -Inf in one cell
    "absent": (185, 185, 185),  # light grey: the site was not computed
}


# How each status reads: short (legend, tooltip, PNG) and in a sentence.
STATUS_WORDS = {
    "finite": "all finite",
    "nan": "NaN",
    "+inf": "+Inf",
    "-inf": "-Inf",
    "mixed": "mixed",
    "absent": "not computed",
}
STATUS_MEANINGS = {
    "finite": "every element finite",
    "nan": "NaN elements",
    "+inf": "+Inf elements",
    "-inf": "-Inf elements",
    "mixed": "several of NaN, +Inf and -Inf",
    "absent": "the site was not computed (e.g. off the gradient path)",
}
# A run's state in the runs overview (tab) and the report (CLI).  A run that stayed finite
# is "healthy" only if it also made progress: the loss at its last logged row is below the
# loss at its first row by at least PROGRESS_MARGIN of the first's magnitude.  Finite is not
# the same as training: a loss stuck at 0.9 is "no_progress", in words "finite".
PROGRESS_MARGIN = 0.05
RUN_STATES = ("nonfinite", "healthy", "no_progress", "skips", "unreadable")
RUN_STATE_WORDS = {
    "nonfinite": "non-finite",
    "healthy": "healthy",
    "no_progress": "finite",
    "skips": "finite",  # followed by its loss-scale skips
    "unreadable": "unreadable",
}
RUN_STATE_MEANINGS = {
    "nonfinite": "a NaN or Inf was recorded",
    "healthy": "every value finite, and the loss went down (its last logged value at least "
    "%d%% below its first)" % round(100 * PROGRESS_MARGIN),
    "no_progress": "every value finite, but the loss did not go down by %d%% from its first logged "
    "value (or no loss was watched): no NaN, but no sign of training either"
    % round(100 * PROGRESS_MARGIN),
    "skips": "every value finite but for loss-scale skips, which are by design",
    "unreadable": "the run's nanwatch data could not be read",
}


def loss_progress(sites, steps, rows):
    """Did the loss go down?  {"first_step", "first", "last_step", "last", "progress"} from
    the loss site's mean (the loss itself, for a scalar loss) at the first and the last row
    that measured it, or None when no loss site was watched or fewer than two rows hold it.
    `sites`: [{"kind", ...}], `steps`: [n_rows], `rows`: [n_rows, n_sites, n_stats]."""
    loss = next((i for i, s in enumerate(sites) if s.get("kind") == "loss"), None)
    if loss is None or len(rows) < 2:
        return None
    values = np.asarray(rows, dtype=np.float64)[:, loss, STAT_INDEX["mean"]]
    measured = np.flatnonzero(np.isfinite(values))
    if len(measured) < 2:
        return None
    a, b = measured[0], measured[-1]
    first, last = float(values[a]), float(values[b])
    return {
        "first_step": int(steps[a]),
        "first": first,
        "last_step": int(steps[b]),
        "last": last,
        "progress": bool(last < first - PROGRESS_MARGIN * abs(first)),
    }


COUNT_WORDS = {"nan": "NaN", "posinf": "+Inf", "neginf": "-Inf"}

# Finite values: one light-to-dark blue ramp, for the tab and the PNG alike.
FINITE_RAMP = (
    (235, 243, 251),
    (198, 219, 239),
    (158, 202, 225),
    (107, 174, 214),
    (66, 146, 198),
    (33, 113, 181),
    (8, 81, 156),
    (8, 48, 107),
)
# The first non-finite cell's frame: this black line with a white one inside it.
FIRST_CELL_OUTLINE = (0, 0, 0)
FIRST_CELL_HALO = (255, 255, 255)
# An exact 0 of a magnitude (log scale: no place on the ramp): its own colour, never the
# ramp's palest blue, which reads as "not measured" (white) -- a dead ReLU layer is data.
ZERO_COLOUR = (125, 170, 70)  # leaf green: a hue neither the ramp nor a status has
NOT_MEASURED_COLOUR = (255, 255, 255)
# Statistics whose danger is a LOW value: drawn with the ramp reversed, so danger reads dark
# (12 doublings from overflow is dark, a safe tensor pale).  High zero or underflow
# fractions already read dark on the ramp.
DANGER_LOW = ("headroom",)
# The statistic a heatmap shows when none is asked for.
DEFAULT_STAT = "max_abs"


def ramp_colour(t):
    """RGB float array for t in [0, 1] along FINITE_RAMP (any shape of t)."""
    ramp = np.asarray(FINITE_RAMP, dtype=np.float64)
    t = np.clip(np.nan_to_num(np.asarray(t, dtype=np.float64)), 0.0, 1.0) * (len(ramp) - 1)
    lo = np.minimum(np.floor(t).astype(int), len(ramp) - 2)
    frac = (t - lo)[..., None]
    return ramp[lo] * (1 - frac) + ramp[lo + 1] * frac


def table_as_json():
    """The table as the frontend and `report --json` consumers see it."""
    return {
        "kinds": [
            {"name": k, "meaning": KIND_MEANINGS[k], "words": KIND_WORDS[k], "phase": PHASES[k]}
            for k in KINDS
        ],
        "stats": [
            dict(s._asdict(), danger="low" if s.name in DANGER_LOW else "high") for s in STATS
        ],
        "status": list(STATUS_NAMES),
        "status_colours": {name: list(rgb) for name, rgb in STATUS_COLOURS.items()},
        "status_words": dict(STATUS_WORDS),
        "status_meanings": dict(STATUS_MEANINGS),
        "count_stats": [{"name": k, "words": COUNT_WORDS[k]} for k in NONFINITE_STATS],
        "run_state_words": dict(RUN_STATE_WORDS),
        "run_state_meanings": dict(RUN_STATE_MEANINGS),
        "finite_ramp": [list(c) for c in FINITE_RAMP],
        "zero_colour": list(ZERO_COLOUR),
        "model_row_kind": MODEL_ROW_KIND,
        "first_cell_outline": list(FIRST_CELL_OUTLINE),
        "first_cell_halo": list(FIRST_CELL_HALO),
        "not_measured_colour": list(NOT_MEASURED_COLOUR),
        "default_stat": DEFAULT_STAT,
    }
