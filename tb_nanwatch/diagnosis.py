"""Signs that come before a blow-up, read off the rows: shared by the CLI and the plugin.

The first non-finite value is where the damage shows; its cause can be earlier and
finite: a float16 tensor that underflowed to zero (Adam's velocity under the
float16 policy makes m / (sqrt(v) + eps) explode a step later), a tensor within
a doubling of its dtype's largest value.  (Loss-scale skips and a collapsed loss
scale are events the writer records itself.)
"""

import numpy as np

from tb_nanwatch import stats, summary

UNDERFLOW_FRACTION = 0.9   # nearly all of a half-precision tensor below the smallest normal
# Where underflow is damage rather than ReLU's honest zeros: slots and weight gradients.
UNDERFLOW_KINDS = ("optimizer_state", "weight_grad")
HEADROOM_DOUBLINGS = 1.0   # max |x| within a factor 2 of the dtype's largest finite value
_HALF = ("float16", "bfloat16")


def precursors(run_data, limit=8):
    """[{step, layer, kind, tensor, sign, value, text}] up to the first non-finite step
    (or the whole run when there is none), earliest first, one per site and sign."""
    first = run_data.first_nonfinite
    until = first["step"] if first else None
    found = {}
    col = stats.STAT_INDEX
    for steps, rows in ((run_data.steps, run_data.rows), (run_data.flight_steps, run_data.flight_rows)):
        for r, step in enumerate(steps):
            starts = step - np.nan_to_num(rows[r, :, col["steps"]], nan=1) + 1
            for s, site in enumerate(run_data.sites):
                if until is not None and starts[s] > until:
                    continue
                if any(np.nan_to_num(rows[r, s, col[k]]) > 0 for k in stats.NONFINITE_STATS):
                    continue   # already non-finite: damage, not a warning sign
                underflow = rows[r, s, col["underflow_frac"]]
                headroom = rows[r, s, col["headroom"]]
                if (site.get("dtype") in _HALF and site["kind"] in UNDERFLOW_KINDS
                        and underflow >= UNDERFLOW_FRACTION):
                    zeros = rows[r, s, col["zero_frac"]]
                    words = ("exactly 0 (underflowed to zero, or no gradient at all)" if zeros >= 0.99 * underflow
                             else "below %s's smallest normal value (underflow)" % site["dtype"])
                    _keep(found, step, site, "underflow", underflow,
                          "%.0f%% of %s %s" % (100 * underflow, summary.site_label(site), words))
                if headroom <= HEADROOM_DOUBLINGS:
                    _keep(found, step, site, "overflow_risk", headroom,
                          "%s within %.1f doublings of %s's largest finite value"
                          % (summary.site_label(site), max(headroom, 0.0), site.get("dtype", "its dtype")))
    return sorted(found.values(), key=lambda p: (p["step"], p["sign"]))[:limit]


def _keep(found, step, site, sign, value, text):
    key = (summary.site_label(site), sign)
    if key not in found or step < found[key]["step"]:
        found[key] = dict(step=int(step), layer=site["layer"], kind=site["kind"], tensor=site.get("tensor", ""),
                          sign=sign, value=float(value), text=text)
