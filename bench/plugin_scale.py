"""The NanWatch plugin at scale: a synthetic 1,000 sites x 100,000 steps run served by a real TensorBoard.

    .venv/bin/python bench/plugin_scale.py                     # RustBoard (default loader), then --load_fast=false
    .venv/bin/python bench/plugin_scale.py --quick             # smaller logdir, fewer queries
    .venv/bin/python bench/plugin_scale.py --out bench/RESULTS.md

1. Writes (once; cached under bench/out/) a logdir through the real record format
   (`tb_nanwatch.summary.RecordWriter`): one run, 1,000 sites, one row every 100 steps
   for 100,000 steps (1,000 rows), a first non-finite record at step 73,421 (site 400) with its
   32 flight-recorder rows, and the NaN propagating to later sites in later rows.
2. Starts `tensorboard --logdir ... --host 127.0.0.1 --port <free>` in its own process
   group (always killed at the end), for each loader asked for.
3. Measures: seconds until `/data/plugin/nanwatch/runs` lists the run, and until the
   heatmap route serves all rows; the first (cold) heatmap request; p50/p95 over repeated
   heatmap requests of the full range and of a zoomed range; the first-non-finite route;
   the peak RSS of TensorBoard's whole process tree (the Python server plus RustBoard's
   data server), sampled from /proc every 0.1 s, and the sum of each process's VmHWM.
"""

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from results_md import publish  # bench/ is the script's directory

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

RUN = "synthetic"
FIRST_AT = 0.73421  # the first NaN: at this fraction of the steps (73,421 of 100,000) ...
FIRST_SITE_AT = 0.4  # ... in the site at this fraction of the site list (400 of 1,000)


# ----------------------------------------------------------------------------- logdir
def site_list(n_sites):
    """A realistic site list of `n_sites` in execution order (a deep stack of Dense blocks)."""
    from tb_nanwatch import summary

    per_layer = (
        12  # activation, activation_grad, 2 weight grads, 4 optimizer slots, 2 weights ... ~12
    )
    n_layers = max(1, (n_sites - 2) // per_layer)
    layers = ["model/block_%d/dense" % i for i in range(n_layers)]
    sites = [summary.make_site("model", "input", "", "float32", (128, 784))]
    sites += [summary.make_site(l, "activation", "", "float32", (128, 1024)) for l in layers]
    sites.append(summary.make_site("model", "loss", "", "float32", ()))
    for l in reversed(layers):
        sites.append(summary.make_site(l, "activation_grad", "", "float32", (128, 1024)))
        sites += [
            summary.make_site(l, "weight_grad", t, "float32", s)
            for t, s in (("kernel", (1024, 1024)), ("bias", (1024,)))
        ]
    for l in layers:
        for t, s in (("kernel", (1024, 1024)), ("bias", (1024,))):
            sites += [
                summary.make_site(l, "optimizer_state", "%s/%s" % (slot, t), "float32", s)
                for slot in ("momentum", "velocity")
            ]
            sites.append(summary.make_site(l, "weight", t, "float32", s))
    i = 0
    while len(sites) < n_sites:  # pad with extra weights of the last layer
        sites.append(summary.make_site(layers[-1], "weight", "extra_%d" % i, "float32", (8,)))
        i += 1
    return sites[:n_sites]


def write_logdir(logdir, n_sites, n_steps, log_every, flight=32):
    """Rows every `log_every` steps through RecordWriter, non-finite from FIRST_STEP at FIRST_SITE on."""
    import synthetic

    from tb_nanwatch import stats, summary

    sites = site_list(n_sites)
    col = stats.STAT_INDEX
    run_dir = os.path.join(logdir, RUN)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    n_rows = n_steps // log_every
    first_step = int(round(FIRST_AT * n_steps))
    first_site = int(FIRST_SITE_AT * n_sites)
    try:  # newer RecordWriters spread rows over tags by step block and need the cadence
        writer = summary.RecordWriter(run_dir, sites, log_every=log_every)
    except TypeError:
        writer = summary.RecordWriter(run_dir, sites)
    with writer as w:
        for i in range(n_rows):
            step = (i + 1) * log_every - 1
            row = synthetic.finite_row(n_sites, step, steps=log_every)
            if step >= first_step:
                start = max(first_step, step - log_every + 1)
                bad = slice(first_site, n_sites)
                row[bad, col["nan"]] = 3 * (step - start + 1)
                row[bad, col["nonfinite_steps"]] = step - start + 1
                row[bad, col["first_nonfinite_step"]] = start
            w.write_row(step, row)
            if step - log_every < first_step <= step:
                steps = list(range(first_step - flight + 1, first_step + 1))
                rows = []
                for s in steps:
                    fr = synthetic.finite_row(n_sites, s, steps=1)
                    if s == first_step:
                        fr[first_site:, col["nan"]] = 3
                        fr[first_site:, col["nonfinite_steps"]] = 1
                        fr[first_site:, col["first_nonfinite_step"]] = first_step
                    rows.append(fr)
                w.write_flight(steps, rows)
                site = sites[first_site]
                w.write_first_nonfinite(
                    first_step,
                    dict(
                        layer=site["layer"],
                        kind=site["kind"],
                        tensor=site["tensor"],
                        site=first_site,
                        nan=3,
                        posinf=0,
                        neginf=0,
                        propagators=[
                            dict(
                                layer=sites[s]["layer"],
                                kind=sites[s]["kind"],
                                tensor=sites[s]["tensor"],
                                nan=3,
                                posinf=0,
                                neginf=0,
                            )
                            for s in range(first_site + 1, min(n_sites, first_site + 50))
                        ],
                    ),
                )
    size = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir))
    return {
        "seconds": time.perf_counter() - t0,
        "bytes": size,
        "rows": n_rows,
        "sites": n_sites,
        "steps": n_steps,
        "log_every": log_every,
        "flight_rows": flight,
        "first_step": first_step,
        "first_site": first_site,
    }


def _format_fingerprint():
    """Changes whenever the record format's code does (then the cached logdir is rewritten)."""
    import hashlib

    h = hashlib.sha1()
    for name in ("summary.py", "metadata.py", "stats.py"):
        with open(os.path.join(ROOT, "tb_nanwatch", name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def ensure_logdir(path, n_sites, n_steps, log_every, rewrite=False):
    stamp = os.path.join(path, "params.json")
    params = {
        "sites": n_sites,
        "steps": n_steps,
        "log_every": log_every,
        "first_at": FIRST_AT,
        "first_site_at": FIRST_SITE_AT,
        "version": 1,
        "format": _format_fingerprint(),
    }
    if not rewrite and os.path.exists(stamp):
        with open(stamp) as f:
            info = json.load(f)
        if info.get("params") == params:
            info["cached"] = True
            return info
    if os.path.exists(path):
        import shutil

        shutil.rmtree(path)
    os.makedirs(path)
    info = write_logdir(path, n_sites, n_steps, log_every)
    info["params"] = params
    with open(stamp, "w") as f:
        json.dump(info, f)
    info["cached"] = False
    return info


# ----------------------------------------------------------------------------- process tree
def _children(pid):
    kids = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return kids


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _status(pid):
    fields = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
    except OSError:
        pass
    return fields


def _kb(value):
    return int(value.split()[0]) * 1024 if value else 0


class MemorySampler(threading.Thread):
    """Samples the RSS sum of a process tree every `interval` s; keeps each process's VmHWM."""

    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_sum = 0
        self.hwm = {}  # pid -> (name, VmHWM bytes)
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        total = 0
        for p in tree(self.pid):
            st = _status(p)
            if st:
                total += _kb(st.get("VmRSS"))
                self.hwm[p] = (
                    st.get("Name", "?"),
                    max(_kb(st.get("VmHWM")), self.hwm.get(p, ("", 0))[1]),
                )
        self.peak_sum = max(self.peak_sum, total)
        return total

    def stop(self):
        self._halt.set()
        self.join(2)
        self.sample()


# ----------------------------------------------------------------------------- HTTP
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WIRE = {}  # path -> bytes on the wire of its last response


def get(base, path, timeout=120, gzip_ok=True):
    """(status, body bytes, seconds) of one GET.  Like a browser, accepts gzip (TensorBoard
    compresses JSON then, at level 3, which is part of the latency); the body returned is
    decompressed, the bytes on the wire go to WIRE[path]."""
    import gzip

    t0 = time.perf_counter()
    request = urllib.request.Request(
        base + path, headers={"Accept-Encoding": "gzip"} if gzip_ok else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read()
            dt = time.perf_counter() - t0
            WIRE[path] = len(body)
            if r.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return r.status, body, dt
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - t0
    except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
        return None, str(e).encode(), time.perf_counter() - t0


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def measure(logdir, info, loader, args):
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [tb, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)]
    if loader == "python":
        cmd.append("--load_fast=false")
    res = {
        "loader": loader,
        "command": " ".join(["tensorboard"] + cmd[1:]).replace(logdir, "LOGDIR"),
    }
    log = open(os.path.join(os.path.dirname(logdir), "tensorboard_%s.log" % loader), "w")
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    q = urllib.parse.quote
    run = q(RUN)
    try:
        deadline = t_start + args.ready_timeout
        # 1) /runs lists the run
        while time.perf_counter() < deadline and proc.poll() is None:
            status, body, _ = get(base, "/data/plugin/nanwatch/runs", timeout=30)
            if status == 200 and RUN in json.loads(body):
                res["runs_listed_s"] = time.perf_counter() - t_start
                break
            time.sleep(0.25)
        # 2) every row served: the heatmap's step_range counts them
        full = "/data/plugin/nanwatch/heatmap?run=%s&stat=max_abs&columns=%d" % (run, args.columns)
        failures = 0
        while (
            "runs_listed_s" in res
            and time.perf_counter() < deadline
            and proc.poll() is None
            and failures < 10
        ):
            status, body, dt = get(base, full)
            if status == 200:
                rng = json.loads(body).get("step_range") or {}
                res.setdefault("first_heatmap_s", dt)
                res["rows_seen"] = rng.get("rows")
                if rng.get("rows") == info["rows"]:
                    res["all_rows_s"] = time.perf_counter() - t_start
                    res["all_rows_heatmap_s"] = dt
                    break
            else:
                failures += 1
                res["heatmap_error"] = "%s %s" % (status, body[:200])
            time.sleep(0.5)
        if "all_rows_s" not in res:
            res["error"] = (
                "no heatmap with all rows after %.0f s (%s; rows seen: %s; process %s)"
                % (
                    time.perf_counter() - t_start,
                    "%d errors in a row: HTTP %s" % (failures, res.get("heatmap_error", "")[:3])
                    if failures
                    else "timed out",
                    res.get("rows_seen"),
                    "alive" if proc.poll() is None else "exited %s" % proc.returncode,
                )
            )
            log.flush()
            res["server_log"] = _last_error(log.name)
            return res
        status, body, _ = get(base, "/data/plugins_listing")
        if status == 200:
            res["tab_enabled"] = bool(json.loads(body).get("nanwatch", {}).get("enabled"))
        # 3) latencies
        zoom_first = max(0, info["first_step"] - 1000)
        zoom = (
            "/data/plugin/nanwatch/heatmap?run=%s&stat=nan&columns=%d&first_step=%d&last_step=%d"
            % (run, args.columns, zoom_first, zoom_first + 2000)
        )
        first = "/data/plugin/nanwatch/first_nonfinite?run=%s" % run
        lat = {"heatmap_full": [], "heatmap_zoom": [], "first_nonfinite": []}
        sizes = {}
        for _ in range(args.repeats):  # interleaved, bounded
            for name, path in (
                ("heatmap_full", full),
                ("heatmap_zoom", zoom),
                ("first_nonfinite", first),
            ):
                status, body, dt = get(base, path)
                if status != 200:
                    res.setdefault("errors", []).append("%s: %s %s" % (name, status, body[:200]))
                    continue
                lat[name].append(dt)
                sizes[name] = (len(body), WIRE.get(path))
        body = json.loads(get(base, zoom)[1])
        res["zoom_columns"] = body.get("n_columns")
        res["first_nonfinite_cell"] = json.loads(get(base, full)[1]).get("first_nonfinite_cell")
        for name, values in lat.items():
            res[name] = {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "n": len(values),
                "bytes": sizes.get(name, (None, None))[0],
                "wire_bytes": sizes.get(name, (None, None))[1],
            }
        # the same full-range query without gzip: how much of the latency is compression
        plain = [get(base, full, gzip_ok=False)[2] for _ in range(max(3, args.repeats // 4))]
        res["heatmap_full_identity"] = {"p50": percentile(plain, 50), "n": len(plain)}
        res["rss_now"] = sampler.sample()
    finally:
        sampler.stop()
        res["peak_rss_sum"] = sampler.peak_sum
        res["vmhwm"] = {"%s[%d]" % (name, pid): hwm for pid, (name, hwm) in sampler.hwm.items()}
        res["vmhwm_sum"] = sum(h for _, h in sampler.hwm.values())
        stop(proc)
        log.close()
    return res


def _last_error(path):
    """The last line of TensorBoard's log that names an error (e.g. gRPC RESOURCE_EXHAUSTED)."""
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if "rror" in l or "EXHAUSTED" in l]
    except OSError:
        return None
    detail = [l for l in lines if l.startswith("details")]
    return (detail or lines or [None])[-1]


def baseline(loader, settle=5.0, timeout=120):
    """TensorBoard's RSS with an empty logdir (the cost of TensorBoard itself, with TensorFlow importable)."""
    import tempfile

    empty = tempfile.mkdtemp(prefix="nw_empty_")
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [tb, "--logdir", empty, "--host", "127.0.0.1", "--port", str(port)]
    if loader == "python":
        cmd.append("--load_fast=false")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    sampler = MemorySampler(proc.pid)
    sampler.start()
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            if get(base, "/data/plugin/nanwatch/runs", timeout=10)[0] == 200:
                break
            time.sleep(0.25)
        time.sleep(settle)
    finally:
        sampler.stop()
        stop(proc)
        os.rmdir(empty)
    return sampler.peak_sum


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# ----------------------------------------------------------------------------- report
def mb(b):
    if b is None:
        return "-"
    return (
        "%.0f MB" % (b / 1e6)
        if b >= 1e7
        else "%.1f MB" % (b / 1e6)
        if b >= 1e6
        else "%.0f kB" % (b / 1e3)
    )


def ms(s):
    return "%.0f ms" % (1e3 * s) if s is not None else "-"


def render(results):
    info = results["logdir"]
    L = ["## Plugin at scale (`bench/plugin_scale.py`)", ""]
    L.append(
        "Run %s. Logdir: %d sites x %d steps, a row every %d steps = %d rows, %d flight rows, first NaN at "
        "step %d (site %d) propagating to all later sites; %s on disk (written through `RecordWriter` in %.0f s). "
        "Load average at start %.2f, at end %.2f."
        % (
            results["date"],
            info["sites"],
            info["steps"],
            info["log_every"],
            info["rows"],
            info["flight_rows"],
            info["first_step"],
            info["first_site"],
            mb(info["bytes"]),
            info["seconds"],
            results["loadavg_start"][0],
            results["loadavg_end"][0],
        )
    )
    L.append("")
    L.append("Code: commit %s. Command: `%s`" % (results.get("commit", "?"), results["command"]))
    L.append("")
    L.append(
        "| loader | runs listed | all rows served | first heatmap (cold) | heatmap full p50 / p95 | "
        "heatmap zoom p50 / p95 | first_nonfinite p50 / p95 | peak RSS (tree, sampled) | sum of VmHWM | "
        "RSS with an empty logdir |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            L.append(
                "| %s | %s | failed: %s | | | | | %s | %s | %s |"
                % (
                    r["loader"],
                    "%.1f s" % r["runs_listed_s"] if "runs_listed_s" in r else "-",
                    r["error"],
                    mb(r.get("peak_rss_sum")),
                    mb(r.get("vmhwm_sum")),
                    mb(r.get("baseline_rss")),
                )
            )
            continue
        L.append(
            "| %s | %.1f s | %.1f s | %s | %s / %s | %s / %s | %s / %s | %s | %s | %s |"
            % (
                r["loader"],
                r["runs_listed_s"],
                r["all_rows_s"],
                ms(r.get("first_heatmap_s")),
                ms(r["heatmap_full"]["p50"]),
                ms(r["heatmap_full"]["p95"]),
                ms(r["heatmap_zoom"]["p50"]),
                ms(r["heatmap_zoom"]["p95"]),
                ms(r["first_nonfinite"]["p50"]),
                ms(r["first_nonfinite"]["p95"]),
                mb(r["peak_rss_sum"]),
                mb(r["vmhwm_sum"]),
                mb(r.get("baseline_rss")),
            )
        )
    L.append("")
    first = info["first_step"]
    for r in results["runs"]:
        if "heatmap_full" in r:
            L.append(
                "- %s: %d requests each, with `Accept-Encoding: gzip` as a browser sends it; full-range response %s "
                "(%s gzipped on the wire; without gzip p50 %s), %d columns requested; zoomed %s (%s columns, "
                "steps %d-%d), first_nonfinite %s; processes: %s."
                % (
                    r["loader"],
                    r["heatmap_full"]["n"],
                    mb(r["heatmap_full"]["bytes"]),
                    mb(r["heatmap_full"].get("wire_bytes")),
                    ms(r.get("heatmap_full_identity", {}).get("p50")),
                    results["columns"],
                    mb(r["heatmap_zoom"]["bytes"]),
                    r.get("zoom_columns"),
                    max(0, first - 1000),
                    first + 1000,
                    "%.1f kB" % (r["first_nonfinite"]["bytes"] / 1e3),
                    ", ".join("%s %s" % (k, mb(v)) for k, v in r["vmhwm"].items()),
                )
            )
        if r.get("server_log"):
            L.append("- %s: TensorBoard's log says: `%s`" % (r["loader"], r["server_log"]))
        for e in r.get("errors", [])[:3]:
            L.append("- %s error: %s" % (r["loader"], e))
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="200 sites x 20,000 steps, 5 repeats, RustBoard only"
    )
    p.add_argument("--sites", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--repeats", type=int)
    p.add_argument(
        "--columns",
        type=int,
        default=500,
        help="heatmap columns per request (the frontend's default)",
    )
    p.add_argument("--loaders", help="comma list of rust,python (default both; quick: rust)")
    p.add_argument(
        "--logdir",
        help="where to write the synthetic logdir (default bench/out/plugin_scale_<sites>x<steps>)",
    )
    p.add_argument(
        "--rewrite", action="store_true", help="write the logdir even if a matching one exists"
    )
    p.add_argument(
        "--ready-timeout", type=float, default=300, help="seconds to wait for all rows per loader"
    )
    p.add_argument("--out", help="update this markdown file (e.g. bench/RESULTS.md)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    sites = args.sites or (200 if args.quick else 1000)
    steps = args.steps or (20000 if args.quick else 100000)
    args.repeats = args.repeats or (5 if args.quick else 20)
    loaders = (args.loaders or ("rust" if args.quick else "rust,python")).split(",")
    logdir = args.logdir or os.path.join(HERE, "out", "plugin_scale_%dx%d" % (sites, steps))
    import overhead

    results = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "loadavg_start": os.getloadavg(),
        "commit": overhead.code_version(),
        "command": " ".join(["python", "bench/plugin_scale.py"] + sys.argv[1:]),
        "columns": args.columns,
    }
    print("writing/reusing %s ..." % logdir, flush=True)
    results["logdir"] = ensure_logdir(logdir, sites, steps, args.log_every, args.rewrite)
    print("logdir: %s" % json.dumps(results["logdir"]), flush=True)
    results["runs"] = []
    for loader in loaders:
        print("tensorboard (%s loader) ..." % loader, flush=True)
        r = measure(logdir, results["logdir"], loader, args)
        r["baseline_rss"] = baseline(loader)
        print(json.dumps(r, indent=1), flush=True)
        results["runs"].append(r)
    results["loadavg_end"] = os.getloadavg()
    publish(results, render(results), args.json, args.out, "plugin")


if __name__ == "__main__":
    main()
