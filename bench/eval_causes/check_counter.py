"""Ground truth for fresh_cases.py (or fresh2_cases.py, fresh3_cases.py), without tb_nanwatch's diagnosis: train each case beside the
independent batch counter of run_eval.py and print what the counter saw.

    .venv/bin/python bench/eval_causes/check_counter.py [--suite fresh|fresh2|fresh3] [--only NAME,...]
        [--json FILE]

For each case: its intended cause, the counter's first bad global batch and what went non-finite
there (the loss, or which model/optimizer variable), the mean loss of the first and of the last
3 batches, seconds, and the error if the case crashed.  The verdict column checks what the batch
must show: a blow-up is non-finite per the counter; a healthy run stays finite and its loss falls.
The report (`read_report`) is never read here.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fresh2_cases  # noqa: E402
import fresh3_cases  # noqa: E402
import fresh_cases  # noqa: E402
import run_eval  # noqa: E402

SUITES = {"fresh": fresh_cases, "fresh2": fresh2_cases, "fresh3": fresh3_cases}


def verdict(c, r):
    if r["train_error"]:
        return "CRASH"
    if c.cause is not None:
        return "ok" if r["counter_first_bad"] is not None else "NOT NON-FINITE"
    fl, ll = r["first_loss"], r["last_loss"]
    if r["counter_first_bad"] is not None:
        return "WENT NON-FINITE"
    if fl is None or ll is None or not math.isfinite(ll) or not ll < fl:
        return "LOSS DID NOT FALL"
    return "ok"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="fresh", help="which batch")
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--json", help="write the per-case results here")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {c.name for c in suite.CASES}
    if unknown:
        ap.error("no such case: %s" % ", ".join(sorted(unknown)))
    base = tempfile.mkdtemp(prefix="fresh_counter_")
    results, t0 = [], time.time()
    try:
        for c in suite.CASES:
            if only and c.name not in only:
                continue
            r = {"name": c.name, "cause": c.cause, "what": c.what}
            r.update(run_eval.train_case(c, os.path.join(base, c.name)))
            r["verdict"] = verdict(c, r)
            fmt = lambda v: "-" if v is None else "%.4g" % v  # noqa: E731
            print(
                "%-30s %-27s bad=%-4s %-52s loss %s -> %s  %4.1fs  %s%s"
                % (
                    c.name,
                    c.cause or "healthy",
                    "-" if r["counter_first_bad"] is None else r["counter_first_bad"],
                    r["counter_what"] or "-",
                    fmt(r["first_loss"]),
                    fmt(r["last_loss"]),
                    r["seconds"],
                    r["verdict"],
                    " " + r["train_error"] if r["train_error"] else "",
                ),
                flush=True,
            )
            results.append(r)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    bad = [r["name"] for r in results if r["verdict"] != "ok"]
    print(
        "%d cases, %.0f s, %d not as intended%s"
        % (len(results), time.time() - t0, len(bad), (": " + ", ".join(bad)) if bad else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
