"""The heatmap's colours stay apart where a reader must tell them apart: "mixed" (several
of NaN, +Inf, -Inf in one cell) against the black frame of the first non-finite cell and
against every other colour, for normal vision and simulated protanopia and deuteranopia.

Distances are CIEDE2000 (Sharma, Wu & Dalal 2005) in CIELAB (D65) after the Machado,
Oliveira & Fernandes (2009) simulation at severity 1.0, applied to linear sRGB.
"""

import numpy as np
import pytest

from tb_nanwatch import stats

VISIONS = {
    "normal": np.eye(3),
    "protanopia": np.array(
        [
            [0.152286, 1.052583, -0.204868],
            [0.114503, 0.786281, 0.099216],
            [-0.003882, -0.048116, 1.051998],
        ]
    ),
    "deuteranopia": np.array(
        [
            [0.367322, 0.860646, -0.227968],
            [0.280085, 0.672501, 0.047413],
            [-0.011820, 0.042940, 0.968881],
        ]
    ),
}
MIN_DISTANCE = 15


def _linear(rgb):
    c = np.asarray(rgb, dtype=np.float64) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(linear_rgb):
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = np.clip(linear_rgb, 0, 1) @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def ciede2000(lab1, lab2):
    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dh = 0.0 if c1p * c2p == 0 else (h2p - h1p + 180) % 360 - 180
    dl, dc = l2 - l1, c2p - c1p
    dhh = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        h_bar = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        h_bar = (h1p + h2p) / 2
    else:
        h_bar = (h1p + h2p + (360 if h1p + h2p < 360 else -360)) / 2
    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    rc = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    rt = -np.sin(np.radians(60 * np.exp(-(((h_bar - 275) / 25) ** 2)))) * rc
    sl = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    sc, sh = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    return float(
        np.sqrt((dl / sl) ** 2 + (dc / sc) ** 2 + (dhh / sh) ** 2 + rt * (dc / sc) * (dhh / sh))
    )


def distance(rgb1, rgb2):
    """The smallest CIEDE2000 distance over the three visions."""
    return min(
        ciede2000(_lab(m @ _linear(rgb1)), _lab(m @ _linear(rgb2))) for m in VISIONS.values()
    )


def test_ciede2000_matches_published_pairs():
    # Sharma, Wu & Dalal (2005), table 1: pairs 1, 7 and 17.
    assert ciede2000((50, 2.6772, -79.7751), (50, 0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert ciede2000((50, 0, 0), (50, -1, 2)) == pytest.approx(2.3669, abs=1e-4)
    assert ciede2000((50, 2.5, 0), (73, 25, -18)) == pytest.approx(27.1492, abs=1e-4)


def test_mixed_is_distinct_from_the_first_cell_frame():
    mixed = stats.STATUS_COLOURS["mixed"]
    assert distance(mixed, stats.FIRST_CELL_OUTLINE) >= MIN_DISTANCE
    assert distance(mixed, stats.FIRST_CELL_HALO) >= MIN_DISTANCE


def test_mixed_is_distinct_from_every_other_colour_of_the_heatmap():
    mixed = stats.STATUS_COLOURS["mixed"]
    others = dict(stats.STATUS_COLOURS, zero=stats.ZERO_COLOUR)
    others["not measured"] = stats.NOT_MEASURED_COLOUR
    del others["mixed"]
    near = {name: round(distance(mixed, rgb), 1) for name, rgb in others.items()}
    assert min(near.values()) >= MIN_DISTANCE, near
    ramp = [stats.ramp_colour(t) for t in np.linspace(0, 1, 33)]
    assert min(distance(mixed, rgb) for rgb in ramp) >= MIN_DISTANCE
