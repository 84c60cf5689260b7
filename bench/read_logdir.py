"""How fast `tb-nanwatch report` reads a big logdir, intact and damaged, against TensorBoard's loader.

    .venv/bin/python bench/read_logdir.py [--sites 400 --rows 2000] [--out bench/RESULTS.md] [--json F]

1. Writes (once; cached under bench/out/) one run through `summary.RecordWriter`: SITES
   sites, a row every 10 steps for ROWS rows, a first non-finite record and flight rows at
   3/4 of the run.
2. Makes a damaged copy: the data checksum of the row at 1/4 of the run broken, and 4 MB of
   zeros appended (what a crash on some filesystems leaves).
3. For each copy, the median of 3 runs of:
   * `tb-nanwatch report --json` in a subprocess (wall seconds, exit status, rows read);
   * TensorBoard's Python loader (EventMultiplexer + MultiplexerDataProvider, TensorFlow's
     record reader, as `--load_fast=false` and the old CLI read) in a subprocess: seconds
     and rows it returns.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from results_md import publish  # bench/ is the script's directory

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TB_LOADER = r"""
import sys, time
from tensorboard.backend.event_processing import data_provider, event_accumulator, plugin_event_multiplexer
from tensorboard import context
from tensorboard.data import provider as p
ctx = context.RequestContext()
start = time.perf_counter()
m = plugin_event_multiplexer.EventMultiplexer(size_guidance={event_accumulator.TENSORS: 0}, max_reload_threads=1)
m.AddRunsFromDirectory(sys.argv[1])
m.Reload()
dp = data_provider.MultiplexerDataProvider(m, sys.argv[1])
tags = [t for t in dp.list_tensors(ctx, experiment_id="", plugin_name="nanwatch").get("run", {}) if "/rows" in t]
got = dp.read_tensors(ctx, experiment_id="", plugin_name="nanwatch", downsample=2**31 - 1,
                      run_tag_filter=p.RunTagFilter(runs=["run"], tags=tags)).get("run", {})
print(time.perf_counter() - start, sum(len(v) for v in got.values()))
"""


def write_logdir(path, n_sites, n_rows):
    import synthetic

    from tb_nanwatch import stats, summary

    sites = [
        summary.make_site("layer_%d" % i, "activation", "", "float32", (32, 64))
        for i in range(n_sites)
    ]
    first = 10 * (3 * n_rows // 4) + 3
    with summary.RecordWriter(os.path.join(path, "run"), sites, log_every=10) as writer:
        for i in range(n_rows):
            step = 10 * i + 9
            row = synthetic.finite_row(n_sites, step, steps=10)
            if step >= first:
                row[n_sites // 2 :, stats.STAT_INDEX["nan"]] = 1
            writer.write_row(step, row)
            if step - 10 < first <= step:
                writer.write_flight(
                    list(range(first - 7, first + 1)),
                    [synthetic.finite_row(n_sites, s) for s in range(first - 7, first + 1)],
                )
                writer.write_first_nonfinite(
                    first,
                    dict(
                        layer=sites[n_sites // 2]["layer"],
                        kind="activation",
                        tensor="",
                        nan=1,
                        posinf=0,
                        neginf=0,
                    ),
                )
    return first


def damage(src, dst, n_rows):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import damage_helpers as dh

    shutil.copytree(src, dst)
    path = dh.only_event_file(os.path.join(dst, "run"))
    data = bytearray(open(path, "rb").read())
    frames, _ = dh.frames(bytes(data))
    rows = [
        f
        for f in frames
        if dh.event_of(f[2]).summary.value
        and dh.event_of(f[2]).summary.value[0].tag.startswith("nanwatch/rows")
    ]
    victim = rows[len(rows) // 4]
    data[victim[1] - 1] ^= 0xFF
    data += bytes(4 << 20)
    open(path, "wb").write(bytes(data))


def timed(command, repeats):
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        runs.append((time.perf_counter() - start, proc))
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sites", type=int, default=400)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--json")
    args = p.parse_args()
    base = os.path.join(HERE, "out", "read_logdir_%dx%d" % (args.sites, args.rows))
    intact = os.path.join(base, "intact")
    if not os.path.isdir(intact):
        write_logdir(intact, args.sites, args.rows)
    damaged = os.path.join(base, "damaged")
    shutil.rmtree(damaged, ignore_errors=True)
    damage(intact, damaged, args.rows)
    cli = os.path.join(os.path.dirname(sys.executable), "tb-nanwatch")
    results = {"sites": args.sites, "rows": args.rows}
    lines = [
        "`bench/read_logdir.py --sites %d --rows %d`: one run, %d rows written; median of %d runs."
        % (args.sites, args.rows, args.rows, args.repeats),
        "",
        "| logdir | MB | `tb-nanwatch report --json` | rows it reads | TensorBoard's Python loader | rows it reads |",
        "|---|---|---|---|---|---|",
    ]
    for name, logdir in (("intact", intact), ("damaged", damaged)):
        size = (
            sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(logdir) for f in fs)
            / 1e6
        )
        seconds, proc = timed([cli, "report", logdir, "--json"], args.repeats)
        report = json.loads(proc.stdout)
        (entry,) = report["runs"]
        from tb_nanwatch import reader

        rows_cli = len(
            reader.read_run(*reader.open_logdir(logdir), "run").steps
        )  # what that report read
        tb_seconds, tb_proc = timed([sys.executable, "-c", TB_LOADER, logdir], args.repeats)
        tb_rows = int(tb_proc.stdout.split()[-1]) if tb_proc.returncode == 0 else None
        results[name] = dict(
            mb=size,
            cli_seconds=seconds,
            cli_exit=proc.returncode,
            cli_rows=rows_cli,
            cli_warnings=entry.get("warnings", []),
            tb_seconds=tb_seconds,
            tb_rows=tb_rows,
        )
        lines.append(
            "| %s | %.0f | %.1f s (exit %d) | %d | %.1f s | %s |"
            % (
                name,
                size,
                seconds,
                proc.returncode,
                rows_cli,
                tb_seconds,
                "crashed" if tb_rows is None else tb_rows,
            )
        )
    lines += [
        "",
        "Damaged: the row at 1/4 of the run has a bad data checksum and 4 MB of zeros follow the "
        "last record. The CLI's warning: `%s`." % "; ".join(results["damaged"]["cli_warnings"]),
        "",
    ]
    publish(results, "\n".join(lines), args.json, args.out, "read_logdir")


if __name__ == "__main__":
    main()
