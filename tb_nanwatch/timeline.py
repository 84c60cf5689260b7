"""A run's rows in bounded memory, whatever its length.  Pure numpy, TensorFlow-free.

Logged rows arrive in step order, a block at a time (`Timeline.add`).  What is kept:

* the first `head` rows as logged (the state training started from);
* the rows before the first non-finite value: the last `tail` at full resolution, the
  older ones folded into at most `overview` coarse rows, each combining the same number
  of consecutive rows by the statistics table's rules (`stats.aggregate`: counts summed,
  extremes kept, the first non-finite step kept), the number doubling as the run grows;
* once the row holding the first non-finite step has arrived, the same again for the rows
  after it, so the blow-up and the steps just before it stay at full resolution however
  long the run goes on afterwards.

A coarse row is a row like any other: its `steps` column says how many training steps it
covers, so a heatmap bins it, a cell shows it, and the rules read it, without knowing.
Zoomed windows that need more than this are read again from the run's files
(`runview.RunView.window`).
"""

import numpy as np

from tb_nanwatch import stats

STEPS = stats.STAT_INDEX["steps"]
FIRST = stats.STAT_INDEX["first_nonfinite_step"]
_SUM_STATS = tuple(k for k, st in enumerate(stats.STATS) if st.aggregate == "sum")
# What one run's kept rows may take, float64: 1,000 sites keep about 700 rows, 5,000 about 140.
ROW_BUDGET_BYTES = 96 * 2**20


class _Pyramid:
    """Rows folded into at most `limit` coarse rows of `span` rows each (the last one may
    hold fewer), `span` doubling whenever the limit is passed."""

    def __init__(self, limit):
        self.limit = max(2, int(limit))
        self.span = 1
        self.steps = []  # per coarse row: its last step
        self.rows = []  # per coarse row: [n_sites, n_stats]
        self.counts = []  # logged rows in each coarse row

    def add(self, steps, rows):
        steps = np.asarray(steps, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.float64)
        while len(steps):
            if self.counts and self.counts[-1] < self.span:  # fill the last coarse row first
                take = self.span - self.counts[-1]
                merged = np.concatenate([self.rows[-1][None], rows[:take]])
                self.rows[-1] = stats.aggregate_rows(merged)
                self.steps[-1] = int(steps[:take][-1])
                self.counts[-1] += len(steps[:take])
                steps, rows = steps[take:], rows[take:]
                continue
            # Whole coarse rows of `span` rows each, in one pass; no more than fit.
            room = max(1, self.limit + 1 - len(self.rows))
            take = min(len(steps), room * self.span)
            starts = np.arange(0, take, self.span)
            self.rows.extend(stats.aggregate(rows[:take], starts, 0))
            ends = np.minimum(starts + self.span, take)
            self.steps.extend(int(steps[e - 1]) for e in ends)
            self.counts.extend(int(e - s) for s, e in zip(starts, ends))
            steps, rows = steps[take:], rows[take:]
            while len(self.rows) > self.limit:
                self._halve()

    def _halve(self):
        self.span *= 2
        stack = np.stack(self.rows)
        starts = np.arange(0, len(stack), 2)
        merged = stats.aggregate(stack, starts, 0)
        self.rows = list(merged)
        self.steps = [self.steps[min(s + 1, len(self.steps) - 1)] for s in starts]
        self.counts = [sum(self.counts[s : s + 2]) for s in starts]

    def __len__(self):
        return len(self.rows)


class _Segment:
    """Rows kept at full resolution (the last `tail`) in front of a pyramid of older ones."""

    def __init__(self, overview, tail):
        self.pyramid = _Pyramid(overview)
        self.tail = int(tail)
        self.tail_steps = np.zeros(0, dtype=np.int64)
        self.tail_rows = None

    def add(self, steps, rows):
        if self.tail_rows is None:
            self.tail_rows = np.zeros((0,) + rows.shape[1:])
        self.tail_steps = np.concatenate([self.tail_steps, steps])
        self.tail_rows = np.concatenate([self.tail_rows, rows])
        spill = len(self.tail_steps) - self.tail
        if spill > 0:
            self.pyramid.add(self.tail_steps[:spill], self.tail_rows[:spill])
            self.tail_steps = self.tail_steps[spill:]
            self.tail_rows = self.tail_rows[spill:]

    def parts(self):
        out = []
        if len(self.pyramid):
            out.append((np.array(self.pyramid.steps, np.int64), np.stack(self.pyramid.rows)))
        if self.tail_rows is not None and len(self.tail_steps):
            out.append((self.tail_steps, self.tail_rows))
        return out

    @property
    def coarse(self):
        return self.pyramid.span > 1


class Timeline:
    """The kept rows of one run (see the module's docstring).

    `until`: the first non-finite step when known in advance (the writer's record, read
    before the rows); otherwise the first row with a non-finite value at an `eligible`
    site freezes the rows before it.  `eligible` ([n_sites] bool) leaves out the sites
    whose non-finite values are by design (gradients on loss-scale skip steps)."""

    def __init__(self, n_sites, until=None, eligible=None, budget_bytes=ROW_BUDGET_BYTES):
        self.n_sites = int(n_sites)
        per_row = max(1, (self.n_sites + 1) * len(stats.STATS) * 8)
        kept = max(64, budget_bytes // per_row)
        self.head = 4
        tail_before, tail_after = max(8, min(48, kept // 8)), max(4, min(8, kept // 32))
        rest = max(16, kept - self.head - tail_before - tail_after)
        self._before = _Segment(rest * 2 // 3, tail_before)
        self._after = _Segment(rest // 3, tail_after)
        self.until = until
        self.eligible = eligible
        self.head_steps = np.zeros(0, dtype=np.int64)
        self.head_rows = np.zeros((0, self.n_sites, len(stats.STATS)))
        self.frozen_at = None  # the step of the row holding the first non-finite value
        self.n_rows = 0  # logged rows seen
        self.last_step = None
        self.steps_watched = 0  # training steps the logged rows cover

    def add(self, steps, rows):
        """Logged rows, steps ascending and after every step added before."""
        steps = np.asarray(steps, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.float64)
        if not len(steps):
            return
        self.n_rows += len(steps)
        self.last_step = int(steps[-1])
        self.steps_watched += int(covered_steps(rows).sum())
        room = self.head - len(self.head_steps)
        if room > 0:
            self.head_steps = np.concatenate([self.head_steps, steps[:room]])
            self.head_rows = np.concatenate([self.head_rows, rows[:room]])
            self._note_blowup(steps[:room], rows[:room])
            steps, rows = steps[room:], rows[room:]
        if not len(steps):
            return
        if self.frozen_at is None:
            cut = self._blowup_row(steps, rows)
            end = len(steps) if cut is None else cut + 1
            self._before.add(steps[:end], rows[:end])
            if cut is not None:
                self.frozen_at = int(steps[cut])
            steps, rows = steps[end:], rows[end:]
        if len(steps):
            self._after.add(steps, rows)

    def _note_blowup(self, steps, rows):
        if self.frozen_at is None:
            cut = self._blowup_row(steps, rows)
            if cut is not None:
                self.frozen_at = int(steps[cut])

    def _blowup_row(self, steps, rows):
        """Index of the first row holding the first non-finite step, or None."""
        if self.until is not None:
            firsts = steps - covered_steps(rows) + 1
            hit = np.nonzero((firsts <= self.until) & (self.until <= steps) | (steps > self.until))[
                0
            ]
            return int(hit[0]) if len(hit) else None
        onset = rows[..., FIRST]
        if self.eligible is not None:
            onset = np.where(self.eligible[None, :], onset, np.nan)
        hit = np.nonzero(~np.isnan(onset).all(axis=1))[0]
        return int(hit[0]) if len(hit) else None

    @property
    def coarse(self):
        """Whether some kept rows combine several logged rows."""
        return self._before.coarse or self._after.coarse

    def rows(self):
        """(steps, rows) of every kept row, in step order."""
        parts = [(self.head_steps, self.head_rows)] + self._before.parts() + self._after.parts()
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.n_sites, len(stats.STATS)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def covered_steps(rows):
    """Training steps each row covers (its `steps` column over the sites; 1 when unknown)."""
    rows = np.asarray(rows)
    if not rows.shape[1]:
        return np.ones(len(rows), dtype=np.int64)
    with np.errstate(invalid="ignore"):
        count = np.fmax.reduce(rows[:, :, STEPS], axis=1)
    return np.where(np.isnan(count), 1, count).astype(np.int64)


def merge_flight(steps, rows, flight_steps, flight_rows):
    """One timeline of logged rows and flight rows (one per step), step ascending.

    Flight rows stand at step resolution.  A logged row ending at a flight step lends the
    flight row what it measured and the flight row lacks (sampled statistics are measured
    on a row's last step); a logged row whose steps all lie within the flight rows' steps
    is then left out; a logged row that reaches into them is shown up to the step before
    the first flight step (or from the step after the last one), its `steps` column saying
    the steps it is shown for, its counts less the flight rows' (exact), its extremes as
    logged (they may come from the overlapped steps).  Returns (steps, rows)."""
    steps = np.asarray(steps, dtype=np.int64)
    flight_steps = np.asarray(flight_steps, dtype=np.int64)
    firsts = steps - covered_steps(rows) + 1 if len(steps) else steps.copy()
    if not len(flight_steps):
        return steps, rows
    flight_rows = np.array(flight_rows, dtype=np.float64)
    lo, hi = int(flight_steps.min()), int(flight_steps.max())
    by_step = {int(t): i for i, t in enumerate(steps)}
    for i, t in enumerate(flight_steps):
        j = by_step.get(int(t))
        if j is not None:
            flight_rows[i] = np.where(np.isnan(flight_rows[i]), rows[j], flight_rows[i])
    flight_rows[..., STEPS] = np.where(np.isnan(flight_rows[..., STEPS]), np.nan, 1.0)
    keep_steps, keep_rows = [], []
    for i in range(len(steps)):
        first, last = int(firsts[i]), int(steps[i])
        if lo <= first and last <= hi:
            continue
        if first < lo <= last:
            last = lo - 1
        elif first <= hi < last:
            first = hi + 1
        row = rows[i]
        if (first, last) != (int(firsts[i]), int(steps[i])):
            row = row.copy()
            row[:, STEPS] = np.where(np.isnan(row[:, STEPS]), np.nan, last - first + 1)
            # Counts (sum rules) are exact: the flight rows' share is taken out.  Extremes
            # stay as logged: they cover the overlapped steps too.
            inside = (flight_steps >= firsts[i]) & (flight_steps <= steps[i])
            if inside.any():
                for k in _SUM_STATS:
                    if k == STEPS:
                        continue
                    taken = np.nansum(flight_rows[inside][..., k], axis=0)
                    row[:, k] = np.where(
                        np.isnan(row[:, k]), np.nan, np.maximum(row[:, k] - taken, 0)
                    )
        keep_steps.append(last)
        keep_rows.append(row)
    all_steps = np.concatenate([np.array(keep_steps, np.int64), flight_steps])
    shape = (0,) + tuple(flight_rows.shape[1:])
    all_rows = np.concatenate([np.stack(keep_rows) if keep_rows else np.zeros(shape), flight_rows])
    order = np.argsort(all_steps, kind="stable")
    return all_steps[order], all_rows[order]


def row_first_steps(steps, rows):
    """First step each row covers: its last step minus its `steps` count, plus one."""
    return (
        np.asarray(steps, dtype=np.int64) - covered_steps(rows) + 1
        if len(steps)
        else np.asarray(steps, dtype=np.int64).copy()
    )


def select_rows(steps, rows, first_step=None, last_step=None):
    """(steps, first steps, rows) of the rows overlapping [first_step, last_step]: the one
    step-window filter of the heatmap, the cell route and the report."""
    firsts = row_first_steps(steps, rows) if len(steps) else steps
    keep = np.ones(len(steps), dtype=bool)
    if first_step is not None:
        keep &= steps >= first_step
    if last_step is not None:
        keep &= firsts <= last_step
    where = np.nonzero(keep)[0]
    if len(where) and where[-1] - where[0] + 1 == len(where):
        where = slice(where[0], where[-1] + 1)  # the usual case: a view, not a copy
    return steps[where], firsts[where], rows[where]
