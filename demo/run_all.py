"""Trains the demo runs into demo/logs/<name> and prints where each first went NaN/Inf.

    python demo/run_all.py                  # train what is missing, reuse the rest
    python demo/run_all.py --retrain        # train everything again
    python demo/run_all.py --only f_huge_data --only a_unscaled_inputs
    python demo/run_all.py --logdir /tmp/demo --json
    python demo/run_all.py --list

The summary line of each run is read back from its event files through
`tb_nanwatch.reader` (what TensorBoard and `tb-nanwatch report` see), not from
the training process.  Exit status 0; 1 when a run's logs disagree with what
its training process recorded, or a run's diagnosis is not the one
scenarios.CAUSE_DEMOS / NO_CAUSE expect; 2 when a run failed to train (the others still
run) or on a usage error.
"""

import argparse
import glob
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import scenarios  # noqa: E402

DEFAULT_LOGDIR = os.path.join(HERE, "logs")


def has_logs(run_dir):
    return scenarios.load_facts(run_dir) is not None and bool(
        glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    )


def summarise(run_dir):
    """What the logs say about one run: steps logged, first non-finite (or None)."""
    from tb_nanwatch import diagnosis, early_warning, reader

    provider, ctx, eid = reader.open_logdir(run_dir)
    runs = reader.list_runs(provider, ctx, eid)
    if not runs:
        return {
            "rows": 0,
            "last_step": None,
            "first_nonfinite": None,
            "causes": [],
            "early_warning_step": None,
        }
    run = sorted(runs)[0]
    data = reader.read_run(provider, ctx, eid, run, runs[run][0])
    warning = early_warning.from_run(data)
    return {
        "rows": int(len(data.steps)),
        "last_step": int(data.steps[-1]) if len(data.steps) else None,
        "first_nonfinite": reader.first_nonfinite_json(data),
        "causes": [d["cause"] for d in diagnosis.diagnose(data)],
        "early_warning_step": None if warning is None else warning["step"],
    }


def diagnosis_disagrees(name, logged):
    """Why a run's diagnosis is not what scenarios.CAUSE_DEMOS / NO_CAUSE say (None if it is)."""
    for cause, (broken, fixed) in scenarios.CAUSE_DEMOS.items():
        if name == broken and logged["causes"][:1] != [cause]:
            return "diagnosis %s, expected %s first" % (logged["causes"], cause)
        if name == fixed and (logged["causes"] or logged["first_nonfinite"] is not None):
            return "the fixed run of %s: %s" % (cause, logged["causes"] or "non-finite")
    if name in scenarios.NO_CAUSE and logged["causes"]:
        return "no cause expected, got %s" % logged["causes"]
    return None


def site_of(first):
    return "/".join(p for p in (first["layer"], first["kind"], first.get("tensor", "")) if p)


def counts_of(first):
    parts = [
        "%d %s" % (first[k], label)
        for k, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
        if first.get(k)
    ]
    return ", ".join(parts)


def line(name, facts, logged, reused):
    first = logged["first_nonfinite"]
    if first is None:
        what = "finite       no NaN/Inf in %d steps" % facts.get("steps", 0)
    else:
        what = "NON-FINITE   first at step %d: %s (%s)" % (
            first["step"],
            site_of(first),
            counts_of(first),
        )
        loss_step = facts.get("keras_loss_nonfinite_step")
        what += "; loss non-finite %s" % (
            "from step %d" % loss_step if loss_step is not None else "never"
        )
    if logged.get("causes"):
        what += "; why: %s" % ", ".join(logged["causes"])
    if logged.get("early_warning_step") is not None:
        what += "; early warning at step %d" % logged["early_warning_step"]
    return "%-28s %s  [%s %.1f s]" % (
        name,
        what,
        "reused, trained in" if reused else "trained in",
        facts.get("train_seconds", float("nan")),
    )


def markdown(results, total):
    out = [
        "| run | kind | first non-finite value (step: site) | loss non-finite | steps | train time | why (diagnosis) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first = r["first_nonfinite"]
        where = (
            "none"
            if first is None
            else "step %d: %s (%s)" % (first["step"], site_of(first), counts_of(first))
        )
        loss = r["keras_loss_nonfinite_step"]
        why = ", ".join("`%s`" % c for c in r.get("causes") or []) or "-"
        if r.get("early_warning_step") is not None:
            why += "; early warning at step %d" % r["early_warning_step"]
        out.append(
            "| `%s` | %s | %s | %s | %s | %.1f s | %s |"
            % (
                r["name"],
                r["kind"],
                where,
                "never" if loss is None else "from step %d" % loss,
                r["steps"],
                r["train_seconds"] or float("nan"),
                why,
            )
        )
    out.append("")
    out.append(
        "%d runs, %.0f s of training."
        % (len(results), sum(r["train_seconds"] or 0 for r in results))
    )
    return "\n".join(out)


def agrees(facts, logged):
    """The record the training process saw and the one in the event files are the same."""
    a, b = facts.get("first_nonfinite"), logged["first_nonfinite"]
    if a is None or b is None:
        return a is None and b is None
    return all(
        a.get(k) == b.get(k) for k in ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf")
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrain", action="store_true", help="train every selected run again")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="train/report only this run (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--logdir", default=DEFAULT_LOGDIR, help="parent of the runs (default demo/logs)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--markdown", action="store_true", help="print the summary as demo/README.md's table"
    )
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)

    if args.list:
        for sc in scenarios.REGISTRY.values():
            print("%-28s %-12s %s" % (sc.name, sc.kind, sc.title))
        return 0
    names = list(scenarios.REGISTRY)
    if args.only:
        names = [n.strip() for spec in args.only for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in scenarios.REGISTRY]
        if unknown:
            parser.error("unknown run(s) %s; see --list" % ", ".join(unknown))

    t0 = time.perf_counter()
    results, status, failed = [], 0, []
    for name in names:
        run_dir = os.path.join(args.logdir, name)
        reused = not args.retrain and has_logs(run_dir)
        if reused:
            facts = scenarios.load_facts(run_dir)
        else:
            if not (args.json or args.markdown):
                print("training %s ..." % name, file=sys.stderr, flush=True)
            try:
                facts = scenarios.train(name, run_dir)
            except Exception:  # one broken run must not take the rest of the demo with it
                traceback.print_exc()
                print("%-28s FAILED to train (traceback above)" % name, file=sys.stderr, flush=True)
                failed.append(name)
                continue
        logged = summarise(run_dir)
        ok = agrees(facts, logged)
        wrong_cause = diagnosis_disagrees(name, logged)
        if not ok or wrong_cause:
            status = 1
        results.append(
            dict(
                name=name,
                kind=scenarios.REGISTRY[name].kind,
                reused=reused,
                train_seconds=facts.get("train_seconds"),
                steps=facts.get("steps"),
                keras_loss_nonfinite_step=facts.get("keras_loss_nonfinite_step"),
                final_loss=facts.get("final_loss"),
                rows=logged["rows"],
                first_nonfinite=logged["first_nonfinite"],
                logs_agree=ok,
                causes=logged["causes"],
                early_warning_step=logged["early_warning_step"],
                diagnosis_problem=wrong_cause,
            )
        )
        if not (args.json or args.markdown):
            print(
                line(name, facts, logged, reused)
                + ("" if ok else "   !! logs disagree with training")
                + ("" if not wrong_cause else "   !! %s" % wrong_cause),
                flush=True,
            )
    total = time.perf_counter() - t0
    if args.json:
        json.dump(
            {"logdir": args.logdir, "total_seconds": round(total, 1), "runs": results},
            sys.stdout,
            indent=1,
            default=scenarios._json_default,
        )
        print()
    elif args.markdown:
        print(markdown(results, total))
    else:
        print(
            "%d runs in %.0f s; logs in %s (tensorboard --logdir %s, or tb-nanwatch report %s)"
            % (len(results), total, args.logdir, args.logdir, args.logdir)
        )
    if failed:
        print("%d run(s) failed to train: %s" % (len(failed), ", ".join(failed)), file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
