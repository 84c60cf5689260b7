"""Early warning: a site on course to overflow, before the first Inf.  Pure numpy.

The writer calls `OverflowForecast.update` on the host after every step with the per-step
L2 norm of every site; the first dict it returns is logged once as a warning and written
as an `early_warning` event.  `from_run` computes the same offline from a run's logged
rows (`report --json` when the run has no such event).

The rule: over the last `window` measured steps, log2 of a site's norm rises steadily
(a least-squares line with slope > 0, rising in at least `steady` of the steps, at least
one doubling over the window), and at that slope it reaches log2 of the dtype's largest
finite value within `horizon` steps, from a norm already past half of those doublings
(above the square root of the largest value).  The norm is at least max |x|, so it reaches the
limit no later than any element does: a conservative, early bound.
"""

import math

import numpy as np

WINDOW = 12  # measured steps the slope is fitted over
HORIZON = 100  # warn when the overflow is predicted within this many steps
STEADY = 0.75  # fraction of the window's steps at which the norm rose
MIN_DOUBLINGS = 1.0  # growth over the window, in doublings: below it, noise or a slow drift

_LIMITS = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
}


def dtype_limit(dtype):
    """The largest finite value of a float dtype name (float32's for anything unknown)."""
    return _LIMITS.get(str(dtype), _LIMITS["float32"])


class OverflowForecast:
    """Watches per-step norms of `sites` (the writer's site dicts, with `dtype`) and
    returns one warning, the first time a site is on course to overflow."""

    def __init__(
        self, sites, window=WINDOW, horizon=HORIZON, steady=STEADY, min_doublings=MIN_DOUBLINGS
    ):
        self.sites = [dict(s) for s in sites]
        self.window, self.horizon, self.steady, self.min_doublings = (
            int(window),
            horizon,
            steady,
            min_doublings,
        )
        self.log2_limit = np.log2([dtype_limit(s.get("dtype")) for s in self.sites])
        n = len(self.sites)
        self._steps = np.full((self.window, n), np.nan)  # ring buffer per site
        self._logs = np.full((self.window, n), np.nan)
        self._count = np.zeros(n, dtype=np.int64)
        self.warning = None

    def update(self, step, norms):
        """`norms`: float64 [n_sites], the L2 norm of each site at `step` (NaN: not computed).
        Returns the warning dict the first time one is due (afterwards None): {"type":
        "early_warning", "step", "site" (index), "layer", "kind", "tensor", "dtype", "norm",
        "limit", "growth_per_step", "doublings_left", "predicted_step"}."""
        if self.warning is not None:
            return None
        norms = np.asarray(norms, dtype=np.float64)
        if norms.shape != (len(self.sites),):
            raise ValueError("norms has shape %s, expected (%d,)" % (norms.shape, len(self.sites)))
        # Zero, NaN (not computed) and Inf (the norm itself overflowed) carry no slope.
        measured = np.isfinite(norms) & (norms > 0)
        slot = self._count % self.window
        idx = np.nonzero(measured)[0]
        self._steps[slot[idx], idx] = step
        with np.errstate(divide="ignore"):
            self._logs[slot[idx], idx] = np.log2(norms[idx])
        self._count[idx] += 1
        ready = idx[self._count[idx] >= self.window]
        # forecast() only warns from past half the doublings to the limit: fit no other site
        # (the writer calls this every step, for every site).
        ready = ready[self._logs[slot[ready], ready] >= self.log2_limit[ready] / 2]
        if not len(ready):
            return None
        found = forecast(
            self._steps[:, ready],
            self._logs[:, ready],
            self.log2_limit[ready],
            step,
            self.horizon,
            self.steady,
            self.min_doublings,
        )
        if found is None:
            return None
        j, slope, left = found
        site_index = int(ready[j])
        self.warning = warning_dict(
            self.sites[site_index], site_index, step, norms[site_index], slope, left
        )
        return self.warning


def forecast(steps, logs, log2_limit, step, horizon, steady, min_doublings):
    """The site (column) predicted to overflow soonest within `horizon` steps of `step`:
    (column, slope in doublings per step, steps left), or None.  steps, logs: [window, n]."""
    order = np.argsort(steps, axis=0)
    t = np.take_along_axis(steps, order, 0)
    y = np.take_along_axis(logs, order, 0)
    t_mean, y_mean = t.mean(0), y.mean(0)
    dt = t - t_mean
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (dt * (y - y_mean)).sum(0) / (dt * dt).sum(0)
        rising = (np.diff(y, axis=0) > 0).mean(0)
        grown = y[-1] - y[0]
        left = (log2_limit - y[-1]) / slope
    # Past half the doublings to the limit (1.8e19 in float32, 256 in float16): a steady rise from
    # far below (a sigmoid leaving 1e-30, a bias leaving 0) is training, not a course to overflow.
    halfway = y[-1] >= log2_limit / 2
    ok = (
        (slope > 0)
        & (rising >= steady)
        & (grown >= min_doublings)
        & halfway
        & (left <= horizon)
        & np.isfinite(left)
    )
    if not ok.any():
        return None
    j = int(np.argmin(np.where(ok, left, np.inf)))
    return j, float(slope[j]), float(max(left[j], 0.0))


def warning_dict(site, index, step, norm, slope, left):
    limit = dtype_limit(site.get("dtype"))
    return {
        "type": "early_warning",
        "step": int(step),
        "site": int(index),
        "layer": site.get("layer", ""),
        "kind": site.get("kind", ""),
        "tensor": site.get("tensor", ""),
        "dtype": site.get("dtype", ""),
        "norm": float(norm),
        "limit": limit,
        "growth_per_step": float(2.0**slope),
        "doublings_left": float(math.log2(limit / norm)) if norm > 0 else None,
        "predicted_step": int(step + math.ceil(left)),
    }


def norm_series(run_data):
    """(steps, norms [n_steps, n_sites]) before the first non-finite step: the logged rows'
    and flight rows' `norm`, merged by step (a flight row where the logged row has none)."""
    from tb_nanwatch import runview

    view = runview.as_view(run_data)
    norms = view.col("norm").copy()
    norms[view.nonfinite()] = np.nan
    steps = view.timeline_steps
    keep = steps < view.until if view.until is not None else np.ones(len(steps), bool)
    return steps[keep], norms[keep]


def from_run(run_data, **kwargs):
    """The early warning of a run: its `early_warning` event if the writer logged one
    (source "event"), else the forecast replayed over its logged norms (source "rows"),
    else None."""
    for e in run_data.events:
        if isinstance(e, dict) and e.get("type") == "early_warning":
            return dict(e, source="event")
    steps, norms = norm_series(run_data)
    detector = OverflowForecast(run_data.sites, **kwargs)
    for step, row in zip(steps, norms):
        found = detector.update(int(step), row)
        if found is not None:
            return dict(found, source="rows")
    return None


def as_json(warning):
    """`report --json`'s "early_warning": {"step", "site": {layer, kind, tensor, dtype, index},
    "predicted_step", ...} or None."""
    if warning is None:
        return None
    out = {
        k: v
        for k, v in warning.items()
        if k not in ("type", "layer", "kind", "tensor", "dtype", "site")
    }
    out["site"] = {
        "layer": warning.get("layer", ""),
        "kind": warning.get("kind", ""),
        "tensor": warning.get("tensor", ""),
        "dtype": warning.get("dtype", ""),
        "index": warning.get("site"),
    }
    return out
