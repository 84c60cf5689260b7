"""Counterfactuals for the blow-ups of fresh2_cases.py or fresh3_cases.py, independent of
tb_nanwatch's diagnosis: each blow-up trained again with the suite's `UNDO = True` (the one thing
its cause names undone: a 10x
lower rate, epsilon > 0 / a non-zero accumulator, standardised data, He init or a zero-init
residual branch, float32, a guarded op, gain < 1) must stay finite per run_eval's batch counter.

    .venv/bin/python bench/eval_causes/counterfactuals.py --suite fresh3 [--only NAME,...]

(fresh_cases.py has its own, fresh_counterfactuals.py: its cases have no UNDO switch.)

Prints, per case, the counter's first bad step as built and as undone; exit 1 when a case does
not blow up as built or does not stay finite once undone.
"""

import argparse
import importlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_eval  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("fresh2", "fresh3"), required=True)
    ap.add_argument("--only", help="comma-separated case names")
    args = ap.parse_args(argv)
    suite = importlib.import_module(args.suite + "_cases")
    only = set(args.only.split(",")) if args.only else None
    failed = []
    for c in suite.CASES:
        if c.cause is None or (only and c.name not in only):
            continue
        row = {}
        for undo in (False, True):
            suite.UNDO = undo
            try:
                row[undo] = run_eval.train_case(c, tempfile.mkdtemp(prefix="%s_cf_" % args.suite))
            finally:
                suite.UNDO = False
        built, undone = row[False], row[True]
        ok = (
            built["counter_first_bad"] is not None
            and undone["counter_first_bad"] is None
            and not built["train_error"]
            and not undone["train_error"]
        )
        if not ok:
            failed.append(c.name)
        print(
            "%-38s %-27s built: bad=%-4s %-40s undone: bad=%-4s loss %s -> %s %s%s"
            % (
                c.name,
                c.cause,
                built["counter_first_bad"],
                built["counter_what"] or "-",
                undone["counter_first_bad"],
                undone["first_loss"] and "%.4g" % undone["first_loss"],
                undone["last_loss"] and "%.4g" % undone["last_loss"],
                "ok" if ok else "NOT AS INTENDED",
                " " + (built["train_error"] or undone["train_error"] or ""),
            ),
            flush=True,
        )
    print("%d not as intended%s" % (len(failed), (": " + ", ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
