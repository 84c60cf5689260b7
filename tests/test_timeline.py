"""timeline: a run's rows in bounded memory (pure numpy)."""

import numpy as np

from tb_nanwatch import stats, timeline

COL = stats.STAT_INDEX


def rows_of(n, n_sites=3, every=100, blowup=None):
    """n logged rows of `every` steps each, ending at steps every-1, 2*every-1, ...; a NaN
    at site 1 from step `blowup` on."""
    steps = np.arange(1, n + 1) * every - 1
    rows = np.zeros((n, n_sites, len(stats.STATS)))
    rows[..., COL["steps"]] = every
    rows[..., COL["size"]] = 10
    rows[..., COL["max_abs"]] = np.arange(n)[:, None] + 1.0
    rows[..., COL["first_nonfinite_step"]] = np.nan
    if blowup is not None:
        bad = steps >= blowup
        rows[bad, 1, COL["nan"]] = 5
        first_row = np.argmax(bad)
        rows[bad, 1, COL["first_nonfinite_step"]] = steps[bad] - every + 1
        rows[first_row, 1, COL["first_nonfinite_step"]] = blowup
    return steps, rows


def fed(n, blocks=7, **kwargs):
    steps, rows = rows_of(n, **kwargs)
    line = timeline.Timeline(rows.shape[1], budget_bytes=200 * 4 * 16 * 4)
    for part in np.array_split(np.arange(n), blocks):
        line.add_table_rows(steps[part], rows[part])
    return steps, rows, line


def test_a_short_run_is_kept_as_logged():
    steps, rows = rows_of(50)
    line = timeline.Timeline(3)
    line.add_table_rows(steps[:20], rows[:20])
    line.add_table_rows(steps[20:], rows[20:])
    kept_steps, kept_rows = line.rows()
    assert np.array_equal(kept_steps, steps)
    assert np.array_equal(kept_rows, rows, equal_nan=True)
    assert not line.coarse and line.n_rows == 50 and line.steps_watched == 5000


def test_a_long_run_is_bounded_and_loses_no_count():
    steps, rows, line = fed(20000)
    kept_steps, kept_rows = line.rows()
    assert line.coarse and len(kept_steps) <= 200
    assert np.all(np.diff(kept_steps) > 0) and kept_steps[-1] == steps[-1]
    # Every step is covered once, and the extremes survive the folding.
    assert timeline.covered_steps(kept_rows).sum() == 20000 * 100 == line.steps_watched
    assert kept_rows[..., COL["max_abs"]].max() == 20000
    assert np.array_equal(kept_rows[:4], rows[:4], equal_nan=True)  # the head, as logged


def test_the_blowup_and_the_rows_before_it_stay_at_full_resolution():
    blowup = 1_234_530
    steps, rows, line = fed(30000, blowup=blowup)
    kept_steps, kept_rows = line.rows()
    assert len(kept_steps) <= 200
    i = int(np.nonzero(kept_rows[:, 1, COL["first_nonfinite_step"]] == blowup)[0][0])
    assert timeline.covered_steps(kept_rows[i : i + 1])[0] == 100  # one logged row, not folded
    assert np.array_equal(kept_steps[i - 8 : i + 1], steps[steps <= blowup + 99][-9:])
    assert line.frozen_at == kept_steps[i]
    # The NaN counts after the blow-up are all there, folded or not.
    assert kept_rows[:, 1, COL["nan"]].sum() == rows[:, 1, COL["nan"]].sum()


def test_a_known_first_step_freezes_at_its_row():
    steps, rows = rows_of(1000)
    line = timeline.Timeline(3, until=50_050, budget_bytes=100 * 4 * 16 * 4)
    line.add_table_rows(steps, rows)
    kept_steps, _ = line.rows()
    assert line.frozen_at == 50_099
    assert np.array_equal(kept_steps[kept_steps <= 50_099][-8:], steps[493:501])


def test_merge_flight_gives_the_steps_before_a_blowup_their_own_rows():
    # log_every=100; blow-up at step 230: logged rows end at 99, 199, 230 (closed at the
    # blow-up) and 299; the flight recorder holds steps 199-230.
    steps = np.array([99, 199, 230, 299])
    rows = np.zeros((4, 2, len(stats.STATS)))
    rows[..., COL["steps"]] = np.array([100, 100, 31, 69])[:, None]
    rows[..., COL["mean"]] = np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    flight_steps = np.arange(199, 231)
    flight = np.full((32, 2, len(stats.STATS)), np.nan)
    flight[..., COL["steps"]] = 1
    flight[..., COL["norm"]] = 1.0
    merged_steps, merged = timeline.merge_flight(steps, rows, flight_steps, flight)
    firsts = merged_steps - timeline.covered_steps(merged) + 1
    assert list(zip(firsts[:2], merged_steps[:2])) == [(0, 99), (100, 198)]
    assert list(merged_steps[2:-1]) == list(range(199, 231))
    assert (firsts[-1], merged_steps[-1]) == (231, 299)
    # The flight row at 230 took the logged row's sampled statistic; 199 took row 199's.
    at = {int(t): i for i, t in enumerate(merged_steps)}
    assert merged[at[230], 0, COL["mean"]] == 3.0 and merged[at[199], 0, COL["mean"]] == 2.0
    assert np.isnan(merged[at[200], 0, COL["mean"]])


def test_fold_as_stored_agrees_with_the_tables_rules():
    """The fast fold (float32, as stored) says what stats.aggregate says of the same rows."""
    from tb_nanwatch import metadata

    rng = np.random.default_rng(0)
    steps, rows = rows_of(12, n_sites=4, every=10, blowup=57)
    rows[..., COL["mean"]] = rng.normal(size=rows.shape[:2])
    rows[..., COL["min"]] = -rng.uniform(1, 5, size=rows.shape[:2])
    rows[..., COL["headroom"]] = rng.uniform(1, 50, size=rows.shape[:2])
    rows[3, 2, COL["max_abs"]] = np.nan  # not measured in one row
    stored = metadata.encode_rows(steps, rows)
    last, folded = timeline.fold(steps, stored, 4)
    assert list(last) == [39, 79, 119]
    got = metadata.decode_rows(folded, timeline.DISK, last)
    want = stats.aggregate(rows, [0, 4, 8], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)  # float32
    assert got[1, 1, COL["first_nonfinite_step"]] == 57


def test_merge_flight_splits_a_row_that_spans_the_flight_steps():
    """log_every=100 over a 42-step run whose blow-up is at step 39: one logged row covers
    steps 1-41 and the flight recorder steps 8-39.  The part before (1-7) has no NaN and no
    statistic measured at step 41; the part after (40-41) has the NaN left and the row's
    last-step statistics.  (The steps before were shown as one row 'at step 7' holding the NaN
    of steps 40-41 and the norm of step 41.)"""
    steps = np.array([0, 41])
    rows = np.zeros((2, 1, len(stats.STATS)))
    rows[..., COL["steps"]] = np.array([1, 41])[:, None]
    rows[:, 0, COL["norm"]] = [3.6, 1.9e36]
    rows[:, 0, COL["first_nonfinite_step"]] = [np.nan, 39]
    rows[1, 0, COL["nan"]] = 3 * 512
    rows[1, 0, COL["nonfinite_steps"]] = 3
    flight_steps = np.arange(8, 40)
    flight = np.full((32, 1, len(stats.STATS)), np.nan)
    flight[..., COL["steps"]] = 1
    flight[..., COL["nan"]] = 0
    flight[..., COL["nonfinite_steps"]] = 0
    flight[..., COL["norm"]] = np.linspace(3.7, 5.8e21, 32)[:, None]
    flight[-1, 0, COL["nan"]] = 512
    flight[-1, 0, COL["nonfinite_steps"]] = 1
    merged_steps, merged = timeline.merge_flight(steps, rows, flight_steps, flight)
    firsts = merged_steps - timeline.covered_steps(merged) + 1
    assert list(zip(firsts, merged_steps))[:2] == [(0, 0), (1, 7)]
    assert (firsts[-1], merged_steps[-1]) == (40, 41)
    before, after = merged[1, 0], merged[-1, 0]
    assert before[COL["nan"]] == 0 and np.isnan(before[COL["first_nonfinite_step"]])
    assert np.isnan(before[COL["norm"]])  # measured at step 41, not in 1-7
    assert after[COL["nan"]] == 2 * 512 and after[COL["nonfinite_steps"]] == 2
    assert after[COL["norm"]] == 1.9e36 and after[COL["first_nonfinite_step"]] == 40
    # Every count is kept exactly once.
    assert merged[:, 0, COL["nan"]].sum() == rows[:, 0, COL["nan"]].sum()
    assert timeline.covered_steps(merged).sum() == 42
