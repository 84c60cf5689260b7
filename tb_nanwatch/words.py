"""How sites, counts and figures read in words: the report, the PNG, the diagnosis and the
CLI say them the same way.  TensorFlow-free, imports only the table."""

import math
import re

from tb_nanwatch import stats

COUNT_LABELS = {"nan": "NaN", "posinf": "+Inf", "neginf": "-Inf"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text):
    """A name as the user wrote it (unicode, `<script>` and all), except control
    characters, which are escaped so that a name cannot break a line or drive the terminal."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), str(text))


kind_words = stats.kind_words


def site_words(site):
    """`dense_1, optimizer state velocity/kernel`; `loss` for the unnamed loss site."""
    what = " ".join(p for p in (kind_words(site.get("kind", "")), site.get("tensor", "")) if p)
    layer = site.get("layer", "")
    return clean("%s, %s" % (layer, what) if layer else what)


def counts_words(obj, only_nonzero=False):
    parts = []
    for k in stats.NONFINITE_STATS:
        n = int(obj.get(k, 0) or 0)
        if n or not only_nonzero:
            parts.append("%s %d" % (COUNT_LABELS[k], n))
    return ", ".join(parts)


def fmt(value, count=False):
    """A statistic for a table cell: '-' when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if count:
        return "%d" % value
    if value == 0:
        return "0"
    return "%.4g" % value
