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
    col = stats.STAT_INDEX
    sites = run_data.sites
    underflow_sites = np.array([s.get("dtype") in _HALF and s["kind"] in UNDERFLOW_KINDS for s in sites], bool)
    found = {}
    for steps, rows in ((run_data.steps, run_data.rows), (run_data.flight_steps, run_data.flight_rows)):
        if not len(steps):
            continue
        with np.errstate(invalid="ignore"):
            eligible = ~(np.nan_to_num(rows[..., [col[k] for k in stats.NONFINITE_STATS]]) > 0).any(-1)
            if until is not None:   # rows that start after the blow-up tell nothing about its cause
                eligible &= (steps[:, None] - np.nan_to_num(rows[..., col["steps"]], nan=1) + 1) <= until
            signs = {
                "underflow": eligible & underflow_sites & (rows[..., col["underflow_frac"]] >= UNDERFLOW_FRACTION),
                "overflow_risk": eligible & (rows[..., col["headroom"]] <= HEADROOM_DOUBLINGS),
            }
        for sign, mask in signs.items():
            earliest = mask.argmax(axis=0)           # rows are in step order
            for s in np.nonzero(mask.any(axis=0))[0]:
                row, site = rows[earliest[s], s], sites[s]
                _keep(found, steps[earliest[s]], site, sign, *_words(sign, row, site))
    return sorted(found.values(), key=lambda p: (p["step"], p["sign"]))[:limit]


def _words(sign, row, site):
    col = stats.STAT_INDEX
    label = summary.site_label(site)
    if sign == "underflow":
        underflow, zeros = row[col["underflow_frac"]], row[col["zero_frac"]]
        words = ("exactly 0 (underflowed to zero, or no gradient at all)" if zeros >= 0.99 * underflow
                 else "below %s's smallest normal value (underflow)" % site["dtype"])
        return underflow, "%.0f%% of %s %s" % (100 * underflow, label, words)
    headroom = row[col["headroom"]]
    return headroom, ("%s within %.1f doublings of %s's largest finite value"
                      % (label, max(headroom, 0.0), site.get("dtype", "its dtype")))


def _keep(found, step, site, sign, value, text):
    key = (summary.site_label(site), sign)
    if key not in found or step < found[key]["step"]:
        found[key] = dict(step=int(step), layer=site["layer"], kind=site["kind"], tensor=site.get("tensor", ""),
                          sign=sign, value=float(value), text=text)
