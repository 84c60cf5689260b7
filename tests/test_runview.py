"""RunView: one set of facts per version of a run's data, read from its files a piece at a
time; the CLI and the tab read the same view."""

import json
import os

import damage_helpers as dh
import numpy as np
import synthetic
from test_plugin_backend import App

from tb_nanwatch import diagnosis, report, runview, stats, summary, timeline

COL = stats.STAT_INDEX
SITES = synthetic.sites_for()
PRODUCER = 9


def test_a_killed_run_without_its_record_stops_the_warning_signs_at_the_blowup(tmp_path):
    """The record was never written (killed): the first non-finite step comes from the rows,
    and a site close to overflow only after that step is no warning sign of it."""
    run = tmp_path / "killed"
    sites = SITES
    with summary.RecordWriter(str(run), sites, log_every=10) as writer:
        for i in range(30):
            step = (i + 1) * 10 - 1
            row = synthetic.finite_row(len(sites), step, steps=10)
            if step >= 155:
                row[PRODUCER:, COL["nan"]] = 4
                row[PRODUCER:, COL["nonfinite_steps"]] = 1
                row[PRODUCER:, COL["first_nonfinite_step"]] = max(155, step - 9)
            if step >= 200:  # after the blow-up, an unrelated site nears float32's limit
                row[2, COL["headroom"]] = 0.5
            writer.write_row(step, row)
    view = runview.from_files("killed", str(run))
    assert view.first_nonfinite is None  # no record on disk
    assert (view.first["step"], view.first["source"]) == (155, "rows")
    assert view.producer == PRODUCER and view.until == 155
    assert diagnosis.precursors(view) == []
    # What the report and the tab say comes from this one view.
    rep = report.RunReport(view)
    assert rep.first["step"] == 155 and rep.precursors == []


def test_skipped_steps_are_counted_one_way_with_check_every_4(tmp_path):
    """One loss-scale skip event may stand for several skipped steps (the writer checks every
    4 steps): the CLI and the tab both count the steps, 12, not the 3 records."""
    run = tmp_path / "logs" / "mixed"
    with summary.RecordWriter(str(run), SITES, log_every=10) as writer:
        for i in range(10):
            step = (i + 1) * 10 - 1
            writer.write_row(step, synthetic.finite_row(len(SITES), step, steps=10))
            if i in (2, 5, 8):
                total = 4 * (1 + (2, 5, 8).index(i))
                writer.write_events(
                    step,
                    [
                        {
                            "type": "loss_scale_skip",
                            "step": step,
                            "loss_scale": 2.0**-i,
                            "skips_total": total,
                        }
                    ],
                )
    view = runview.from_files("mixed", str(run))
    assert len(view.skips) == 3 and view.skipped_steps == 12
    rc, out, err = dh.run_cli(tmp_path / "logs", "--json")
    (entry,) = json.loads(out)["runs"]
    assert rc == 0 and entry["skipped_steps"] == 12 and len(entry["loss_scale_skips"]) == 3
    rc, text, _ = dh.run_cli(tmp_path / "logs")
    assert "12 loss-scale skips" in text
    (line,) = App(tmp_path / "logs").json("/overview")
    assert line["state"] == "skips" and line["loss_scale_skips"] == 12


def test_a_growing_run_is_read_from_where_the_last_read_stopped(tmp_path):
    run = tmp_path / "live"
    source = runview.RunSource("live", str(run))
    with summary.RecordWriter(str(run), SITES, log_every=10) as writer:
        for i in range(40):
            step = (i + 1) * 10 - 1
            writer.write_row(step, synthetic.finite_row(len(SITES), step, steps=10))
        writer.flush()
        first = source.view()
        assert first.n_logged_rows == 40 and source.view() is first  # nothing new: same view
        read_before = source.files.bytes_read
        size_before = os.path.getsize(dh.only_row_file(run))
        writer.write_row(409, synthetic.finite_row(len(SITES), 409, steps=10))
        writer.flush()
        second = source.view()
    assert second is not first and second.n_logged_rows == 41 and second.last_step == 409
    # The reload read the new row's bytes, not the run again.
    grown = os.path.getsize(dh.only_row_file(run)) - size_before
    assert 0 < source.files.bytes_read - read_before == grown


def test_a_long_run_keeps_a_bounded_view_and_reads_zoomed_windows_again(tmp_path, monkeypatch):
    # A budget of about 100 rows for this site list: 3,000 rows are folded.
    monkeypatch.setattr(timeline, "ROW_BUDGET_BYTES", 100 * (len(SITES) + 1) * 16 * 4)
    run = tmp_path / "long"
    synthetic.write_run(str(run), n_rows=3000, log_every=10, first=(21_003, PRODUCER, "posinf"))
    view = runview.from_files("long", str(run))
    assert view.coarse and len(view.steps) <= 100 and view.n_logged_rows == 3000
    assert view.steps_watched == 30_000 and view.first["step"] == 21_003
    # Every count survives the folding.
    posinf_written = sum(
        3 * (step - max(21_003, step - 9) + 1) for step in range(9, 30_000, 10) if step >= 21_003
    )
    assert np.nansum(view.rows[:, PRODUCER, COL["posinf"]]) == posinf_written
    # A zoomed window far from the blow-up comes back at full resolution from the files.
    steps, rows = view.rows_in(5_000, 5_499, max_rows=500)
    assert list(steps) == list(range(5_009, 5_500, 10)) + [5_509][: int(steps[-1] == 5_509)]
    assert set(timeline.covered_steps(rows)) == {10}
    written = synthetic.finite_row(len(SITES), 5_009, steps=10)
    np.testing.assert_allclose(rows[0, :, COL["max_abs"]], written[:, COL["max_abs"]], rtol=1e-6)
    # The tab says how many logged rows a view covers, folded or not.
    from tb_nanwatch import plugin

    body = plugin.heatmap_body(view, "max_abs", "all", 500, None, None, "rows")
    assert body["logged_rows"] == 3000 and sum(body["rows_per_column"]) < 3000
    zoomed = plugin.heatmap_body(view, "max_abs", "all", 500, 5_000, 5_499, "rows")
    assert zoomed["logged_rows"] == 50 and zoomed["rows_per_column"] == [1] * zoomed["n_columns"]
