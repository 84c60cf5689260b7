"""The early-warning detector (tb_nanwatch/early_warning.py): synthetic norm series, and the
per-step norms of a real (numpy, float32) SGD linear regression whose learning rate is just
above the stable limit.  The demo runs (tests/test_diagnosis_demo.py) check it on Keras runs."""

import math

import numpy as np
import pytest

from tb_nanwatch import early_warning, reader, stats, summary


def sites(n=3, dtype="float32"):
    return [summary.make_site("dense_%d" % i, "weight", "kernel", dtype, (8, 1)) for i in range(n)]


def feed(detector, series, start=0):
    """Feeds [n_steps, n_sites] norms; (step, warning) of the first warning, or (None, None)."""
    for i, norms in enumerate(series):
        found = detector.update(start + i, norms)
        if found is not None:
            return start + i, found
    return None, None


def test_geometric_growth_warns_ahead_and_predicts_the_step():
    # log2(norm) = 0.5 * step: float32's largest value (2^128) is reached at step 256.
    steps = np.arange(300)
    series = np.stack([2.0 ** (0.5 * steps), np.ones(300), np.full(300, np.nan)], axis=1)
    detector = early_warning.OverflowForecast(sites())
    step, w = feed(detector, series)
    assert w is not None and step <= 256 - 20
    assert w["site"] == 0 and (w["layer"], w["kind"], w["tensor"], w["dtype"]) == (
        "dense_0",
        "weight",
        "kernel",
        "float32",
    )
    assert abs(w["predicted_step"] - 256) <= 2
    assert w["growth_per_step"] == pytest.approx(2**0.5, rel=1e-6)
    assert w["type"] == "early_warning" and w["step"] == step
    assert w["doublings_left"] == pytest.approx(math.log2(w["limit"] / w["norm"]))
    # One warning per run.
    assert detector.update(step + 1, series[step + 1]) is None


def test_float16_sites_use_float16s_limit():
    steps = np.arange(60)
    series = (2.0 ** (0.4 * steps))[:, None]  # 65504 ~ 2^16 at step 40
    step, w = feed(early_warning.OverflowForecast(sites(1, "float16")), series)
    assert (
        w is not None and w["limit"] == 65504.0 and abs(w["predicted_step"] - 40) <= 2 and step < 40
    )
    step32, _ = feed(early_warning.OverflowForecast(sites(1, "float32")), series)
    assert step32 is None


def test_healthy_series_get_no_warning():
    rng = np.random.default_rng(0)
    n = 2000
    steps = np.arange(n)
    weights = 3.0 * (1 + 0.5 * (1 - np.exp(-steps / 300))) * np.exp(0.02 * rng.standard_normal(n))
    loss = 2.0 * np.exp(-steps / 400) + 0.05 * rng.random(n)
    grads = np.exp(rng.standard_normal(n))  # noisy, not growing
    rising_from_zero = 1e-30 * 2.0 ** np.minimum(
        steps, 100
    )  # a sigmoid leaving 0: far from the limit
    series = np.stack([weights, loss, grads, rising_from_zero], axis=1)
    assert feed(early_warning.OverflowForecast(sites(4)), series) == (None, None)


def test_slow_growth_far_from_the_limit_is_not_a_warning():
    steps = np.arange(3000)
    series = (1e20 * 1.001**steps)[:, None]  # on course to overflow, but thousands of steps away
    assert feed(early_warning.OverflowForecast(sites(1)), series) == (None, None)


def test_bad_input_is_a_clear_error():
    detector = early_warning.OverflowForecast(sites(3))
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        detector.update(0, [1.0, 2.0])


def test_not_computed_and_overflowed_norms_are_skipped():
    steps = np.arange(300)
    series = (2.0 ** (0.5 * steps))[:, None].copy()
    series[::3] = np.nan  # not computed at every third step
    series[5] = np.inf
    step, w = feed(early_warning.OverflowForecast(sites(1)), series)
    assert w is not None and abs(w["predicted_step"] - 256) <= 3 and step <= 236


def sgd_linear_regression(lr, steps=2000, batch=32, seed=0):
    """Plain numpy float32 SGD on mse; per-step norms of weight, gradient and loss (the
    quantities the writer logs), up to the first non-finite value: (norms, first step)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1024, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((1024, 1))).astype(np.float32)
    w = (rng.uniform(-1, 1, (8, 1)) * math.sqrt(6 / 9)).astype(np.float32)
    out = []
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps):
            i = (step * batch) % 1024
            xb, yb = x[i : i + batch], y[i : i + batch]
            residual = xb @ w - yb
            loss = np.float32(np.mean(residual * residual, dtype=np.float32))
            grad = (np.float32(2.0 / batch) * xb.T @ residual).astype(np.float32)
            w = (w - np.float32(lr) * grad).astype(np.float32)
            values = [
                np.float32(np.sqrt(np.sum(t.astype(np.float64) ** 2))) for t in (residual, grad, w)
            ] + [abs(loss)]
            if not all(np.isfinite(t).all() for t in (residual, loss, grad, w)):
                return np.array(out), step
            out.append(values)
    return np.array(out), None


def regression_sites():
    return [
        summary.make_site("dense", "activation", "", "float32", (32, 1)),
        summary.make_site("dense", "weight_grad", "kernel", "float32", (8, 1)),
        summary.make_site("dense", "weight", "kernel", "float32", (8, 1)),
        summary.make_site("", "loss", "", "float32", ()),
    ]


@pytest.mark.parametrize("lr", [0.9, 0.95, 1.0])
def test_sgd_just_above_the_stable_limit_warns_20_steps_ahead(lr):
    norms, first = sgd_linear_regression(lr)
    assert first is not None and first >= 150, (
        "expected a gradual divergence, got the first non-finite at %s" % first
    )
    step, w = feed(early_warning.OverflowForecast(regression_sites()), norms)
    assert w is not None, "no warning before the first non-finite step %d" % first
    assert first - step >= 20, (step, first)
    assert w["predicted_step"] >= step


@pytest.mark.parametrize("lr", [0.05, 0.5, 0.8])
def test_sgd_below_the_limit_gets_no_warning(lr):
    norms, first = sgd_linear_regression(lr)
    assert first is None
    assert feed(early_warning.OverflowForecast(regression_sites()), norms) == (None, None)


def run_data(norms, events=(), first=None):
    n_steps, n_sites = norms.shape
    rows = np.full((n_steps, n_sites, len(stats.STATS)), np.nan)
    for name in ("nan", "posinf", "neginf"):
        rows[..., stats.STAT_INDEX[name]] = 0
    rows[..., stats.STAT_INDEX["steps"]] = 1
    rows[..., stats.STAT_INDEX["size"]] = 8
    rows[..., stats.STAT_INDEX["norm"]] = norms
    return reader.RunData(
        "r",
        None,
        regression_sites()[:n_sites],
        np.arange(n_steps),
        rows,
        np.zeros(0, np.int64),
        np.zeros((0, n_sites, len(stats.STATS))),
        first,
        list(events),
    )


def test_from_run_replays_the_logged_norms_or_takes_the_event():
    norms, first = sgd_linear_regression(1.05)
    data = run_data(norms)
    w = early_warning.from_run(data)
    assert w is not None and w["source"] == "rows" and first - w["step"] >= 20
    as_json = early_warning.as_json(w)
    assert set(as_json) >= {"step", "site", "predicted_step", "growth_per_step"}
    assert as_json["site"]["layer"] == w["layer"] and as_json["site"]["index"] == w["site"]
    event = dict(w, step=7, predicted_step=99)
    event.pop("source")
    assert early_warning.from_run(run_data(norms, events=[event]))["step"] == 7
    healthy, _ = sgd_linear_regression(0.5, steps=400)
    assert early_warning.from_run(run_data(healthy)) is None
