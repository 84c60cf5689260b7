"""Long runs: logs of a million to five million steps, opened by a real TensorBoard and the CLI.

    .venv/bin/python bench/long_runs.py                       # every case, default sizes
    .venv/bin/python bench/long_runs.py --quick               # 10x smaller, to try it
    .venv/bin/python bench/long_runs.py --cases big,live --out bench/RESULTS.md

Logs are written through the TF-free writer (`tb_nanwatch.summary.RecordWriter(logdir,
sites, log_every=100).write_row(step, row)`), cached under bench/out/long_runs/ until the
record format changes.  Cases:

* big:   1,000 sites x 50,000 rows (5M steps at log_every=100); first NaN at 73.4% of the
         steps in the site at 40% of the list, with its 32 flight rows.
* wide:  5,000 sites x 10,000 rows.
* sweep: 200 runs x 200 sites x 1,000 rows.
* live:  a run of 10,000 rows (1,000 sites) growing by one row a second while served.

For big and wide, per loader (RustBoard, the default, and `--load_fast=false`): seconds from
starting `tensorboard --logdir` to a correct default heatmap (the first non-finite cell at
the first non-finite step, in a column of its own), peak RSS of TensorBoard's process tree
(sampled every 0.1 s), and p50 latencies of switching statistic, switching kind,
`/diagnosis` and `/precursors`; then `tb-nanwatch report --json`: seconds and peak RSS.
For sweep: the CLI's seconds and peak RSS, and seconds until the tab's `/overview` lists
every run.  For live: the server time of one reload after each new row (p50, max).
`--load_fast=false` is also timed with TensorFlow hidden from TensorBoard (its pure-Python
checksums), on the big case.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import plugin_scale  # noqa: E402 (bench/ is on the path above)
from results_md import publish  # noqa: E402

FIRST_AT, FIRST_SITE_AT = 0.73421, 0.4
OUT = os.path.join(ROOT, "bench", "out", "long_runs")


# ----------------------------------------------------------------------------- logs
def write_run(run_dir, n_sites, n_rows, log_every=100, first=True, flight=32, start_row=0):
    """A run through RecordWriter; returns (first step, first site)."""
    import numpy as np

    from tb_nanwatch import stats, summary

    sites = plugin_scale.site_list(n_sites)
    col = stats.STAT_INDEX
    n_steps = n_rows * log_every
    first_step = int(round(FIRST_AT * n_steps)) if first else None
    first_site = int(FIRST_SITE_AT * n_sites)
    base = _finite_row(n_sites)
    with summary.RecordWriter(run_dir, sites, log_every=log_every) as writer:
        for i in range(start_row, n_rows):
            step = (i + 1) * log_every - 1
            row = base.copy()
            row[:, col["steps"]] = log_every
            row[:, [col["min"], col["max"], col["max_abs"], col["mean"], col["std"]]] *= 1 + (
                step / 1e6
            )
            if first_step is not None and step >= first_step:
                begin = max(first_step, step - log_every + 1)
                row[first_site:, col["nan"]] = 3 * (step - begin + 1)
                row[first_site:, col["nonfinite_steps"]] = step - begin + 1
                row[first_site:, col["first_nonfinite_step"]] = begin
            writer.write_row(step, row)
            if first_step is not None and step - log_every < first_step <= step:
                steps = list(range(first_step - flight + 1, first_step + 1))
                rows = []
                for s in steps:
                    fr = base.copy()
                    if s == first_step:
                        fr[first_site:, col["nan"]] = 3
                        fr[first_site:, col["nonfinite_steps"]] = 1
                        fr[first_site:, col["first_nonfinite_step"]] = first_step
                    rows.append(fr)
                writer.write_flight(steps, rows)
                site = sites[first_site]
                writer.write_first_nonfinite(
                    first_step,
                    dict(
                        layer=site["layer"],
                        kind=site["kind"],
                        tensor=site["tensor"],
                        site=first_site,
                        nan=3,
                        posinf=0,
                        neginf=0,
                    ),
                )
    del np
    return first_step, first_site


def _finite_row(n_sites):
    import numpy as np

    from tb_nanwatch import stats

    col = stats.STAT_INDEX
    row = np.full((n_sites, len(stats.STATS)), np.nan)
    row[:, col["steps"]] = 1
    row[:, col["size"]] = 128
    for name in ("nan", "posinf", "neginf", "nonfinite_steps", "zero_frac"):
        row[:, col[name]] = 0
    magnitude = 1 + np.arange(n_sites, dtype=float)
    row[:, col["min"]], row[:, col["max"]], row[:, col["max_abs"]] = (
        -magnitude,
        magnitude,
        magnitude,
    )
    row[:, col["mean"]], row[:, col["std"]] = 0.01 * magnitude, 0.5 * magnitude
    row[:, col["norm"]] = row[:, col["max_norm"]] = 8 * magnitude
    row[:, col["headroom"]] = np.log2(3.4e38 / magnitude)
    return row


def ensure(name, make):
    """bench/out/long_runs/<name>, written by make(path) once per record format."""
    path = os.path.join(OUT, name)
    stamp = os.path.join(path, "params.json")
    fingerprint = plugin_scale._format_fingerprint()
    if os.path.exists(stamp):
        with open(stamp) as f:
            info = json.load(f)
        if info.get("format") == fingerprint:
            return path, info
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    t0 = time.perf_counter()
    info = make(path)
    info.update(format=fingerprint, write_seconds=time.perf_counter() - t0, bytes=_du(path))
    with open(stamp, "w") as f:
        json.dump(info, f)
    return path, info


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- TensorBoard
def start_tensorboard(logdir, loader, env=None):
    port = plugin_scale.free_port()
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [tb, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)]
    if loader == "python":
        cmd.append("--load_fast=false")
    log = open(os.path.join(OUT, "tensorboard.log"), "a")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    return (
        proc,
        "http://127.0.0.1:%d" % port,
        " ".join(["tensorboard"] + cmd[1:]).replace(logdir, "LOGDIR"),
    )


def get_json(base, path, timeout=300):
    status, body, dt = plugin_scale.get(base, path, timeout=timeout)
    return status, (json.loads(body) if status == 200 else body[:300]), dt


def p50(values):
    return plugin_scale.percentile(values, 50)


def open_big(logdir, info, loader, run, env=None, timeout=900):
    """Start -> correct default heatmap, peak RSS, switching latencies."""
    proc, base, command = start_tensorboard(logdir, loader, env)
    sampler = plugin_scale.MemorySampler(proc.pid)
    sampler.start()
    t0 = time.perf_counter()
    res = {"loader": loader, "command": command}
    q = urllib.parse.quote(run)
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            status, body, _ = get_json(base, "/data/plugin/nanwatch/heatmap?run=%s" % q)
            cell = body.get("first_nonfinite_cell") if status == 200 else None
            if cell and cell["step"] == info["first_step"]:
                last = body["last_steps"][cell["column"]]
                first = body["first_steps"][cell["column"]]
                res["default_heatmap_s"] = time.perf_counter() - t0
                res["first_cell_column"] = [first, last]
                break
            time.sleep(0.5)
        if "default_heatmap_s" not in res:
            res["error"] = "no correct default heatmap after %.0f s" % (time.perf_counter() - t0)
            return res
        lat = {"stat": [], "kind": []}
        for stat in ("nan", "mean", "norm", "max", "std", "zero_frac"):
            lat["stat"].append(
                get_json(base, "/data/plugin/nanwatch/heatmap?run=%s&stat=%s" % (q, stat))[2]
            )
        for kind in ("activation", "weight_grad", "optimizer_state", "weight", "activation_grad"):
            lat["kind"].append(
                get_json(base, "/data/plugin/nanwatch/heatmap?run=%s&kind=%s" % (q, kind))[2]
            )
        for route in ("diagnosis", "precursors"):
            lat[route] = [get_json(base, "/data/plugin/nanwatch/%s?run=%s" % (route, q))[2]]
        zoom = info["first_step"] - 2000
        lat["zoom"] = [
            get_json(
                base,
                "/data/plugin/nanwatch/heatmap?run=%s&first_step=%d&last_step=%d"
                % (q, zoom, zoom + 4000),
            )[2]
        ]
        res["latency_p50"] = {k: p50(v) for k, v in lat.items()}
        res["latency_max"] = {k: max(v) for k, v in lat.items()}
    finally:
        sampler.stop()
        res["peak_rss"] = sampler.peak_sum
        plugin_scale.stop(proc)
    return res


def run_cli(logdir, *args):
    cli = os.path.join(os.path.dirname(sys.executable), "tb-nanwatch")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [cli, "report", logdir, "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sampler = plugin_scale.MemorySampler(proc.pid, interval=0.05)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    res = {
        "command": "tb-nanwatch report LOGDIR --json",
        "seconds": time.perf_counter() - t0,
        "peak_rss": sampler.peak_sum,
        "exit": proc.returncode,
    }
    try:
        runs = json.loads(out)["runs"]
        res["runs"] = len(runs)
        res["first_steps"] = sorted(
            {(r.get("first_nonfinite") or {}).get("step") for r in runs} - {None}
        )[:3]
    except ValueError:
        res["error"] = err.decode(errors="replace")[-300:]
    return res


def case_big(args, name, n_sites, n_rows):
    logdir, info = ensure(
        name,
        lambda p: dict(
            zip(("first_step", "first_site"), write_run(os.path.join(p, "run"), n_sites, n_rows)),
            sites=n_sites,
            rows=n_rows,
        ),
    )
    out = {"logdir": info, "loaders": []}
    for loader in args.loaders:
        out["loaders"].append(open_big(logdir, info, loader, "run"))
    out["cli"] = run_cli(logdir)
    return out


def case_python_without_tf(args, name):
    logdir, info = os.path.join(OUT, name), json.load(open(os.path.join(OUT, name, "params.json")))
    hide = tempfile.mkdtemp(prefix="nw_notf_")
    os.makedirs(os.path.join(hide, "tensorflow"))
    with open(os.path.join(hide, "tensorflow", "__init__.py"), "w") as f:
        f.write('raise ImportError("hidden by bench/long_runs.py")\n')
    env = dict(os.environ, PYTHONPATH=hide)
    res = open_big(logdir, info, "python", "run", env=env)
    res["tensorflow"] = "hidden"
    shutil.rmtree(hide)
    return res


def case_sweep(args, n_runs, n_sites, n_rows):
    def make(path):
        for i in range(n_runs):
            write_run(os.path.join(path, "run_%03d" % i), n_sites, n_rows, first=(i % 3 == 0))
        return {"runs": n_runs, "sites": n_sites, "rows": n_rows}

    logdir, info = ensure("sweep_%d" % n_runs, make)
    out = {"logdir": info, "cli": run_cli(logdir)}
    proc, base, command = start_tensorboard(logdir, "rust")
    sampler = plugin_scale.MemorySampler(proc.pid)
    sampler.start()
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < 900 and proc.poll() is None:
            status, body, _ = get_json(base, "/data/plugin/nanwatch/overview")
            if status == 200 and len(body) == n_runs:
                out["overview_s"] = time.perf_counter() - t0
                out["overview_nonfinite"] = sum(1 for r in body if r.get("state") == "nonfinite")
                break
            time.sleep(0.5)
    finally:
        sampler.stop()
        out["tensorboard_peak_rss"] = sampler.peak_sum
        out["command"] = command
        plugin_scale.stop(proc)
    return out


def case_live(args, n_sites, n_rows, seconds):
    logdir = os.path.join(OUT, "live")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    run_dir = os.path.join(logdir, "run")
    write_run(run_dir, n_sites, n_rows, first=False)
    writer = subprocess.Popen(
        [sys.executable, __file__, "--grow", run_dir, str(n_sites), str(n_rows), str(seconds)]
    )
    proc, base, command = start_tensorboard(logdir, "rust")
    times, rows_seen = [], []
    try:
        t0 = time.perf_counter()
        last = None
        while time.perf_counter() - t0 < seconds + 30 and writer.poll() is None:
            status, body, dt = get_json(base, "/data/plugin/nanwatch/heatmap?run=run")
            if status == 200:
                rows = body["step_range"]["rows"]
                if last is not None and rows != last:
                    times.append(dt)  # a reload that read the new row(s)
                    rows_seen.append(rows)
                last = rows
            time.sleep(1.0)
    finally:
        writer.kill()
        plugin_scale.stop(proc)
    return {
        "command": command,
        "reloads": len(times),
        "reload_p50_s": p50(times),
        "reload_max_s": max(times) if times else None,
        "rows_from_to": [rows_seen[0], rows_seen[-1]] if rows_seen else None,
    }


def grow(run_dir, n_sites, n_rows, seconds):
    """The live run's writer: one row a second after the first n_rows."""
    from tb_nanwatch import summary

    sites = plugin_scale.site_list(n_sites)
    row = _finite_row(n_sites)
    row[:, 0] = 100
    with summary.RecordWriter(run_dir, sites, log_every=100) as writer:
        for i in range(n_rows, n_rows + seconds):
            writer.write_row((i + 1) * 100 - 1, row)
            writer.flush()
            time.sleep(1.0)


# ----------------------------------------------------------------------------- report
def render(results):
    mb = plugin_scale.mb
    lines = [
        "## Long runs (`bench/long_runs.py`, %s)" % results["date"],
        "",
        "Command: `%s`.  Machine: %s.  Logs written through `RecordWriter` (protocol 3: rows in"
        " the run's row file, read by tb_nanwatch only)."
        % (results["command"], results["machine"]),
        "",
        "| case | logs | loader | start to correct default heatmap | peak RSS (TensorBoard tree) "
        "| switch stat / kind (p50) | /diagnosis | /precursors | zoom | CLI `report --json` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("big", "wide"):
        case = results.get(name)
        if not case:
            continue
        info = case["logdir"]
        what = "%s sites x %s rows, %s" % (
            format(info["sites"], ","),
            format(info["rows"], ","),
            mb(info["bytes"]),
        )
        cli = case["cli"]
        cli_text = "%.0f s, %s peak" % (cli["seconds"], mb(cli["peak_rss"]))
        for res in case["loaders"] + (
            [results["python_without_tf"]]
            if name == "big" and results.get("python_without_tf")
            else []
        ):
            loader = res["loader"] + (
                " (TensorFlow hidden)" if res.get("tensorflow") == "hidden" else ""
            )
            if "error" in res:
                lines.append(
                    "| %s | %s | %s | %s | %s | | | | | %s |"
                    % (name, what, loader, res["error"], mb(res.get("peak_rss")), cli_text)
                )
                continue
            lat = res["latency_p50"]
            lines.append(
                "| %s | %s | %s | %.1f s (column %s) | %s | %.2f s / %.2f s | %.2f s | %.2f s | %.2f s | %s |"
                % (
                    name,
                    what,
                    loader,
                    res["default_heatmap_s"],
                    "-".join(map(str, res["first_cell_column"])),
                    mb(res["peak_rss"]),
                    lat["stat"],
                    lat["kind"],
                    lat["diagnosis"],
                    lat["precursors"],
                    lat["zoom"],
                    cli_text,
                )
            )
    sweep = results.get("sweep")
    if sweep:
        info = sweep["logdir"]
        lines += [
            "",
            "Sweep of %d runs x %d sites x %s rows (%s): CLI %.0f s, %s peak RSS; the tab's `/overview` lists"
            " every run after %s (TensorBoard tree peak %s)."
            % (
                info["runs"],
                info["sites"],
                format(info["rows"], ","),
                mb(info["bytes"]),
                sweep["cli"]["seconds"],
                mb(sweep["cli"]["peak_rss"]),
                "%.1f s" % sweep["overview_s"] if "overview_s" in sweep else "never",
                mb(sweep["tensorboard_peak_rss"]),
            ),
        ]
    live = results.get("live")
    if live:
        lines += [
            "",
            "Live run of %s rows growing by a row a second: %d reloads that read new rows, server time p50 %s,"
            " max %s (rows %s)."
            % (
                format(results["live_rows"], ","),
                live["reloads"],
                plugin_scale.ms(live["reload_p50_s"]),
                plugin_scale.ms(live["reload_max_s"]),
                live["rows_from_to"],
            ),
        ]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--grow":
        grow(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x smaller logs")
    parser.add_argument("--cases", default="big,wide,sweep,live,notf")
    parser.add_argument("--loaders", default="rust,python")
    parser.add_argument("--out", help="update this RESULTS.md")
    parser.add_argument("--json", help="save the raw results here")
    parser.add_argument(
        "--merge",
        nargs="+",
        help="render the results of earlier --json files together, run nothing",
    )
    args = parser.parse_args()
    if args.merge:
        results = {}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            commands = [results["command"]] if "command" in results else []
            results.update(part)
            results["command"] = "; ".join(commands + [part["command"]])
        publish(results, render(results), None, args.out, "long_runs")
        return
    args.loaders = args.loaders.split(",")
    cases = args.cases.split(",")
    scale = 10 if args.quick else 1
    os.makedirs(OUT, exist_ok=True)
    results = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/long_runs.py " + " ".join(sys.argv[1:]),
        "machine": "%d cores, %s" % (os.cpu_count(), os.uname().machine),
    }
    if "big" in cases:
        results["big"] = case_big(
            args, "big%s" % ("_quick" if args.quick else ""), 1000, 50000 // scale
        )
        print(json.dumps(results["big"], indent=1), flush=True)
    if "notf" in cases and "big" in cases:
        results["python_without_tf"] = case_python_without_tf(
            args, "big%s" % ("_quick" if args.quick else "")
        )
        print(json.dumps(results["python_without_tf"], indent=1), flush=True)
    if "wide" in cases:
        results["wide"] = case_big(
            args, "wide%s" % ("_quick" if args.quick else ""), 5000, 10000 // scale
        )
        print(json.dumps(results["wide"], indent=1), flush=True)
    if "sweep" in cases:
        results["sweep"] = case_sweep(args, 200 // scale, 200, 1000)
        print(json.dumps(results["sweep"], indent=1), flush=True)
    if "live" in cases:
        results["live_rows"] = 10000 // scale
        results["live"] = case_live(args, 1000, 10000 // scale, 40)
        print(json.dumps(results["live"], indent=1), flush=True)
    publish(results, render(results), args.json, args.out, "long_runs")


if __name__ == "__main__":
    main()
