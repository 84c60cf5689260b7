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

from tb_nanwatch import metadata, stats

STEPS = stats.STAT_INDEX["steps"]
_SUM_STATS = tuple(k for k, st in enumerate(stats.STATS) if st.aggregate == "sum")
# What one run's kept rows may take, as stored (float32, 64 bytes a site): 1,000 sites keep
# about 500 rows (the default heatmap's columns), 5,000 about 100.
ROW_BUDGET_BYTES = 32 * 2**20

# Rows are kept as stored on disk (protocol 2/3: float32 [1 + n_sites, len(DISK_STATS)], the
# steps a row covers in its header line, the first non-finite step as an offset back from
# the row's last step), and folded in that layout, a block at a time: a long run's rows are
# each touched about twice, in float32, never copied into the table's float64 layout.
DISK = metadata.DISK_STATS
_OFFSET = DISK.index(metadata.FIRST_OFFSET)
_RULES = {name: stats.STATS_BY_NAME[name].aggregate for name in DISK if name in stats.STATS_BY_NAME}
_DISK_SUM = [j for j, n in enumerate(DISK) if _RULES.get(n) == "sum"]
_DISK_MAX = [j for j, n in enumerate(DISK) if _RULES.get(n) == "max"]
_DISK_MIN = [j for j, n in enumerate(DISK) if _RULES.get(n) == "min"]
_DISK_MEAN = [j for j, n in enumerate(DISK) if _RULES.get(n) == "mean"]


def fold(steps, rows, size):
    """Consecutive groups of `size` stored rows (float32 [n, 1 + n_sites, len(DISK)], n a
    multiple of `size`, ending at `steps`) combined by the table's rules:
    (group last steps, rows [n // size, 1 + n_sites, len(DISK)])."""
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    if size == 1 or not n:
        return steps, rows
    groups = rows.reshape((n // size, size) + rows.shape[1:])
    out = np.empty((n // size,) + rows.shape[1:], dtype=rows.dtype)
    with np.errstate(invalid="ignore"):
        out[:, 0] = np.nansum(groups[:, :, 0], axis=1)  # the header: steps covered, summed
        body = groups[:, :, 1:]
        highest = np.fmax.reduce(body, axis=1)  # NaN only where nothing was measured
        out[:, 1:, _DISK_MAX] = highest[..., _DISK_MAX]
        out[:, 1:, _DISK_MIN] = np.fmin.reduce(body[..., _DISK_MIN], axis=1)
        counts = body[..., _DISK_SUM]
        summed = np.nansum(counts, axis=1)
        summed[np.isnan(highest[..., _DISK_SUM])] = np.nan
        out[:, 1:, _DISK_SUM] = summed
        # The mean, weighted by the steps each row covers.
        weight = np.broadcast_to(groups[:, :, :1, :1], body.shape[:3] + (1,))
        for j in _DISK_MEAN:
            value = body[..., j : j + 1]
            present = ~np.isnan(value)
            total = np.where(present, value * weight, 0).sum(axis=1)
            out[:, 1:, j : j + 1] = total / np.where(present, weight, 0).sum(axis=1)
        # The first non-finite step: the earliest, as an offset from the group's last step.
        last = steps.reshape(-1, size)
        onset = last[:, :, None].astype(np.float64) - body[..., _OFFSET]
        first = np.fmin.reduce(onset, axis=1)
        out[:, 1:, _OFFSET] = last[:, -1:] - first
    return last[:, -1], out


class _Pyramid:
    """Rows folded into at most `limit` coarse rows of `span` rows each (the last one may
    hold fewer), `span` doubling whenever the limit is passed.  Stored in place: adding a
    block copies the block, never the pyramid."""

    def __init__(self, limit):
        self.limit = max(2, int(limit))
        self.span = 1
        self.n = 0
        self._steps = np.zeros(self.limit + 1, np.int64)
        self._rows = None  # [limit + 1, 1 + n_sites, len(DISK)], the first n in use
        self.last_count = 0  # logged rows in the last coarse row

    @property
    def steps(self):
        return self._steps[: self.n]

    @property
    def rows(self):
        return self._rows[: self.n]

    def _append(self, steps, rows):
        if self._rows is None:
            self._rows = np.empty((self.limit + 1,) + rows.shape[1:], rows.dtype)
        self._steps[self.n : self.n + len(steps)] = steps
        self._rows[self.n : self.n + len(steps)] = rows
        self.n += len(steps)

    def add(self, steps, rows):
        steps = np.asarray(steps, dtype=np.int64)
        while len(steps):
            if self.n and self.last_count < self.span:  # fill the last coarse row first
                take = min(len(steps), self.span - self.last_count)
                merged = np.concatenate([self._rows[self.n - 1 : self.n], rows[:take]])
                merged_steps = np.concatenate([self._steps[self.n - 1 : self.n], steps[:take]])
                _, folded = fold(merged_steps, merged, len(merged))
                self._rows[self.n - 1] = folded[0]
                self._steps[self.n - 1] = steps[take - 1]
                self.last_count += take
                steps, rows = steps[take:], rows[take:]
                continue
            room = self.limit + 1 - self.n
            whole = min(len(steps) // self.span, room) * self.span
            take = whole if whole else min(len(steps), self.span)
            size = self.span if whole else take
            new_steps, new_rows = fold(steps[:take], rows[:take], size)
            self._append(new_steps, new_rows)
            self.last_count = size
            steps, rows = steps[take:], rows[take:]
            while self.n > self.limit:
                self._halve()

    def _halve(self):
        """Pairs of coarse rows folded into one; an odd last row stays as it is (it then
        holds fewer rows than the new span)."""
        n = self.n
        paired = n - n % 2
        steps, rows = fold(self._steps[:paired], self._rows[:paired], 2)
        half = paired // 2
        self._steps[:half], self._rows[:half] = steps, rows
        if n % 2:
            self._steps[half], self._rows[half] = self._steps[n - 1], self._rows[n - 1]
            self.n = half + 1
        else:
            self.last_count += self.span
            self.n = half
        self.span *= 2

    def __len__(self):
        return self.n


class _Segment:
    """Rows kept at full resolution (the last `tail`) in front of a pyramid of older ones."""

    def __init__(self, overview, tail):
        self.pyramid = _Pyramid(overview)
        self.tail = int(tail)
        self.tail_steps = np.zeros(0, dtype=np.int64)
        self.tail_rows = None

    def add(self, steps, rows):
        spill = len(self.tail_steps) + len(steps) - self.tail
        if spill > 0 and self.tail_rows is not None and len(self.tail_steps):
            # The oldest kept rows go to the pyramid first, then as many new ones as needed.
            out = min(spill, len(self.tail_steps))
            self.pyramid.add(self.tail_steps[:out], self.tail_rows[:out])
            self.tail_steps, self.tail_rows = self.tail_steps[out:], self.tail_rows[out:]
            spill -= out
        if spill > 0:
            self.pyramid.add(steps[:spill], rows[:spill])
            steps, rows = steps[spill:], rows[spill:]
        if len(steps):
            self.tail_steps = np.concatenate([self.tail_steps, steps])
            self.tail_rows = (
                rows.copy() if self.tail_rows is None else np.concatenate([self.tail_rows, rows])
            )

    def parts(self):
        out = []
        if len(self.pyramid):
            out.append((self.pyramid.steps, self.pyramid.rows))
        if self.tail_rows is not None and len(self.tail_steps):
            out.append((self.tail_steps, self.tail_rows))
        return out

    @property
    def coarse(self):
        return self.pyramid.span > 1


class Timeline:
    """The kept rows of one run (see the module's docstring).  Rows come in the stored
    layout (`add`) or the table's (`add_table_rows`).

    `until`: the first non-finite step when known in advance (the writer's record, read
    before the rows); otherwise the first row with a non-finite value at an `eligible`
    site freezes the rows before it.  `eligible` ([n_sites] bool) leaves out the sites
    whose non-finite values are by design (gradients on loss-scale skip steps)."""

    def __init__(self, n_sites, until=None, eligible=None, budget_bytes=None):
        self.n_sites = int(n_sites)
        budget_bytes = budget_bytes or ROW_BUDGET_BYTES
        per_row = max(1, (self.n_sites + 1) * len(DISK) * 4)
        kept = max(64, budget_bytes // per_row)
        self.head = 4
        tail_before, tail_after = max(8, min(48, kept // 8)), max(4, min(8, kept // 32))
        rest = max(16, kept - self.head - tail_before - tail_after)
        self._before = _Segment(rest * 2 // 3, tail_before)
        self._after = _Segment(rest // 3, tail_after)
        self.until = until
        self.eligible = eligible
        self.head_steps = np.zeros(0, dtype=np.int64)
        self.head_rows = np.zeros((0, self.n_sites + 1, len(DISK)), np.float32)
        self.frozen_at = None  # the step of the row holding the first non-finite value
        self.n_rows = 0  # logged rows seen
        self.last_step = None
        self.steps_watched = 0  # training steps the logged rows cover

    def add_table_rows(self, steps, rows):
        """Rows in the table's layout (float64 [n, n_sites, n_stats])."""
        self.add(steps, metadata.encode_rows(steps, rows))

    def add(self, steps, rows):
        """Stored rows, steps ascending and after every step added before."""
        steps = np.asarray(steps, dtype=np.int64)
        if not len(steps):
            return
        self.n_rows += len(steps)
        self.last_step = int(steps[-1])
        self.steps_watched += int(np.nansum(rows[:, 0, 0]))
        room = self.head - len(self.head_steps)
        if room > 0:
            self.head_steps = np.concatenate([self.head_steps, steps[:room]])
            self.head_rows = np.concatenate([self.head_rows, rows[:room]])
            if self.frozen_at is None:
                cut = self._blowup_row(steps[:room], rows[:room])
                if cut is not None:
                    self.frozen_at = int(steps[cut])
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

    def _blowup_row(self, steps, rows):
        """Index of the first row holding the first non-finite step, or None."""
        if self.until is not None:
            covered = np.nan_to_num(rows[:, 0, 0], nan=1).astype(np.int64)
            firsts = steps - covered + 1
            hit = np.nonzero(
                ((firsts <= self.until) & (self.until <= steps)) | (steps > self.until)
            )[0]
            return int(hit[0]) if len(hit) else None
        offsets = rows[:, 1:, _OFFSET]
        if self.eligible is not None:
            offsets = offsets[:, self.eligible]
        with np.errstate(invalid="ignore"):
            hit = np.nonzero(~np.isnan(offsets).all(axis=1))[0]
        return int(hit[0]) if len(hit) else None

    @property
    def coarse(self):
        """Whether some kept rows combine several logged rows."""
        return self._before.coarse or self._after.coarse

    def stored_rows(self):
        """(steps, rows) of every kept row, in step order, as stored."""
        parts = [(self.head_steps, self.head_rows)] + self._before.parts() + self._after.parts()
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return np.zeros(0, dtype=np.int64), self.head_rows[:0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def rows(self):
        """(steps, rows) of every kept row, in step order, in the table's layout (float64)."""
        steps, stored = self.stored_rows()
        return steps, metadata.decode_rows(stored, DISK, steps)


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
    is then left out.  A logged row that reaches into them is shown for the rest of its
    steps: the part before the first flight step and the part after the last one, each a row
    whose `steps` column says the steps it covers (`_residual`).  Returns (steps, rows)."""
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
    before_steps, before_rows, after_steps, after_rows = [], [], [], []
    for i in range(len(steps)):
        first, last = int(firsts[i]), int(steps[i])
        if lo <= first and last <= hi:
            continue  # all its steps have flight rows
        if last < lo or first > hi:
            (before_steps if last < lo else after_steps).append(last)
            (before_rows if last < lo else after_rows).append(rows[i])
            continue
        share = (flight_steps >= first) & (flight_steps <= last)
        before, after = _residual(rows[i], first, last, lo, hi, flight_rows[share])
        if before is not None:
            before_steps.append(lo - 1)
            before_rows.append(before)
        if after is not None:
            after_steps.append(last)
            after_rows.append(after)
    width = rows.shape[1:] if len(steps) else flight_rows.shape[1:]
    out_steps = np.array(before_steps + list(flight_steps) + after_steps, dtype=np.int64)
    out = np.concatenate(
        [
            np.array(before_rows).reshape((-1,) + width),
            flight_rows,
            np.array(after_rows).reshape((-1,) + width),
        ]
    )
    return out_steps, out


# What the before part of a logged row keeps (the row's last step is not in it): its counts,
# `size` and the first non-finite step; the rest was measured at, or over, steps it lacks.
_BEFORE_KEEPS = frozenset(_SUM_STATS) | {
    stats.STAT_INDEX["size"],
    stats.STAT_INDEX["first_nonfinite_step"],
}
_NONFINITE_COUNTS = tuple(
    stats.STAT_INDEX[k] for k in ("nan", "posinf", "neginf", "nonfinite_steps")
)
_FIRST_BAD = stats.STAT_INDEX["first_nonfinite_step"]


def _residual(row, first, last, lo, hi, flight_share):
    """(before, after): the parts of a logged row covering [first, last] outside the flight
    rows' steps [lo, hi], each a row or None.  Counts are exact: the flight rows' share is
    taken out, and the non-finite counts left go to the before part when the row's first
    non-finite step is before `lo`, else to the after part.  The row's last-step statistics
    (and its maxima over all steps, which may come from the flight steps) stay with the after
    part; the before part keeps only what `_BEFORE_KEEPS` names."""
    left = row.copy()
    for k in _SUM_STATS:
        taken = np.nansum(flight_share[..., k], axis=0)
        left[:, k] = np.where(np.isnan(row[:, k]), np.nan, np.maximum(row[:, k] - taken, 0))
    first_bad = row[:, _FIRST_BAD]
    bad_before = first_bad < lo  # NaN (none): False
    parts = []
    for part_first, part_last, holds in (
        (first, lo - 1, bad_before),
        (hi + 1, last, ~bad_before),
    ):
        if part_first > part_last:
            parts.append(None)
            continue
        part = left.copy()
        part[:, STEPS] = np.where(np.isnan(row[:, STEPS]), np.nan, part_last - part_first + 1)
        for k in _NONFINITE_COUNTS:
            part[:, k] = np.where(holds | np.isnan(part[:, k]), part[:, k], 0.0)
        any_bad = np.nan_to_num(part[:, stats.STAT_INDEX["nonfinite_steps"]]) > 0
        # At or after the part's first step when the row's first one was in the flight steps.
        part[:, _FIRST_BAD] = np.where(
            any_bad, np.clip(np.nan_to_num(first_bad, nan=part_first), part_first, None), np.nan
        )
        if part_last != last:
            for k in range(part.shape[-1]):
                if k not in _BEFORE_KEEPS:
                    part[:, k] = np.nan
        parts.append(part)
    return parts[0], parts[1]


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
