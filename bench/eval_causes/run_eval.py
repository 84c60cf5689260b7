"""How well does tb_nanwatch name the cause?  Train every case, read the report, score it.

    .venv/bin/python bench/eval_causes/run_eval.py [--replay] [--out docs] [--json FILE]
                                                   [--only NAME,...] [--keep DIR]

The cases: cases.py (tune = even index in CASES, held-out = odd index), fresh_cases.py
("fresh": written by someone who had not read the rules while they were tuned) and
fresh2_cases.py and fresh3_cases.py ("fresh 2", "fresh 3": the same, each written while a change
to the rules was made).
Each case trains into its own logdir with `NanWatchCallback` and, beside it, an independent
batch counter (`FirstBadStep`): after every batch it checks the batch's loss and every model
and optimizer variable for NaN/Inf, so the first bad step it records is the global batch whose
loss or update went non-finite -- without tb_nanwatch.  Then `tb-nanwatch report LOGDIR --json`
(a subprocess, as a user runs it) gives the ranked `diagnosis` and `first_nonfinite`.
With --replay each blow-up trains again with on_nonfinite="stop", its failing step is replayed
(`tb_nanwatch.replay`, which tries the diagnosed causes' mechanical remedies) and the report is
read again.

Scores, for each half:
  blow-ups: top-1 (the first cause named is the intended one), top-2 (it is among the first two),
            first step agrees (report's first_nonfinite step == the counter's first bad step);
            with --replay, top-1 after the replay, and of the blow-ups whose first cause then has
            a mechanical remedy, how many stayed finite with its first remedy;
  healthy:  false alarms (any cause or an early warning), and whether the loss went down.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import cases as cases_module  # noqa: E402

from tb_nanwatch import causes as causes_table  # noqa: E402


def suites():
    """[(module, half of a case by its index)]: cases.py split by index into tune (even) and
    held-out (odd); fresh_cases.py all "fresh", fresh2_cases.py "fresh 2", fresh3 "fresh 3"."""
    found = [(cases_module, lambda i: "tune" if i % 2 == 0 else "held-out")]
    for name, half in (
        ("fresh_cases", "fresh"),
        ("fresh2_cases", "fresh 2"),
        ("fresh3_cases", "fresh 3"),
    ):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found.append((module, lambda i, half=half: half))
    return found


HALVES = ("tune", "held-out", "fresh", "fresh 2", "fresh 3")

BEGIN, END = "<!-- cause_evaluation:begin -->", "<!-- cause_evaluation:end -->"
COMMAND = causes_table.EVALUATION_COMMAND


def make_counter():
    import keras
    import numpy as np

    class FirstBadStep(keras.callbacks.Callback):
        """The first global batch whose loss or whose update (weights, optimizer slots) is
        non-finite; stops training two batches later (nothing after it is scored).

        Keras logs the epoch's running mean of the loss (a float32 sum of loss * batch size),
        which can overflow while every batch's loss is finite; a float64 tracker, reset before
        each batch, makes `logs["loss"]` this batch's loss (a displayed metric only: the weights
        are computed as without it)."""

        def __init__(self):
            super().__init__()
            self.step = 0
            self.first_bad = None
            self.what = None
            self.losses = []  # each batch's loss

        def on_train_begin(self, logs=None):
            if getattr(self.model, "_loss_tracker", None) is not None:
                self.model._loss_tracker = keras.metrics.Mean(name="loss", dtype="float64")

        def on_train_batch_begin(self, batch, logs=None):
            tracker = getattr(self.model, "_loss_tracker", None)
            if tracker is not None:
                tracker.reset_state()

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", 0.0))
            self.losses.append(loss)
            if self.first_bad is None:
                bad = None
                if not math.isfinite(loss):
                    bad = "loss"
                else:
                    for v in list(self.model.weights) + list(self.model.optimizer.variables):
                        a = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                        if a.dtype.kind == "f" and not np.isfinite(a).all():
                            bad = "variable %s" % (getattr(v, "path", None) or v.name)
                            break
                if bad:
                    self.first_bad, self.what = self.step, bad
            elif self.step >= self.first_bad + 2:
                self.model.stop_training = True
            self.step += 1

    return FirstBadStep()


def train_case(c, logdir):
    import keras

    keras.utils.set_random_seed(1234)
    keras.backend.clear_session()
    counter = make_counter()
    t0 = time.time()
    error = None
    try:
        c.fn(logdir, [counter])
    except Exception as e:  # a case that crashes is scored as a miss, with its error shown
        error = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return {
        "seconds": round(time.time() - t0, 1),
        "counter_first_bad": counter.first_bad,
        "counter_what": counter.what,
        # the mean loss of the first and of the last 3 batches (healthy runs must make progress)
        "first_loss": sum(counter.losses[:3]) / 3 if len(counter.losses) >= 6 else None,
        "last_loss": sum(counter.losses[-3:]) / 3 if len(counter.losses) >= 6 else None,
        "train_error": error,
    }


def replay_case(c, logdir):
    """The replay pass: trains the case again with on_nonfinite="stop" (the failing step is
    rolled back and its repro bundle written), replays that step on the live model
    (`tb_nanwatch.replay`, which tries the diagnosed causes' mechanical remedies and keeps its
    result beside the run), and reads the report again, as a user who ran
    `tb-nanwatch replay RUN_DIR` does."""
    import keras

    import tb_nanwatch
    from tb_nanwatch import bundle

    keras.utils.set_random_seed(1234)
    keras.backend.clear_session()
    counter = make_counter()  # holds the model for the replay
    cases_module.WATCH_OPTIONS["on_nonfinite"] = "stop"
    try:
        c.fn(logdir, [counter])
    except Exception as e:
        return {"replay_error": "training: %s" % str(e).splitlines()[0][:200]}
    finally:
        cases_module.WATCH_OPTIONS.pop("on_nonfinite", None)
    if not os.path.isdir(bundle.bundle_dir(logdir)):
        return {"replay_error": "no repro bundle written"}
    try:
        result = tb_nanwatch.replay(logdir, model=counter.model).as_json()
    except Exception as e:  # a replay that fails is scored as no remedy tried
        return {"replay_error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200])}
    after = read_report(logdir)
    return {
        "replay_verdict": result.get("verdict"),
        "replay_op": (result.get("op") or {}).get("type"),
        "replay_remedies": result.get("remedies") or [],
        "causes_after_replay": after.get("causes") or [],
    }


def remedy_outcome(r):
    """(applicable, held) for the remedy of the cause named first after the replay: whether the
    replay could apply it mechanically (one of its variants, `replay_step.MECHANICAL`), and
    whether the step was finite with one of them."""
    top = (r.get("causes_after_replay") or [None])[0]
    trials = [
        e for e in r.get("replay_remedies") or [] if e.get("cause") == top and e.get("applied")
    ]
    if top is None or not trials:
        return False, False
    return True, any(e.get("finite_after") for e in trials)


def read_report(logdir):
    exe = os.path.join(os.path.dirname(sys.executable), "tb-nanwatch")
    p = subprocess.run([exe, "report", logdir, "--json"], capture_output=True, text=True)
    if p.returncode not in (0, 1) or not p.stdout.strip():
        return {"report_error": (p.stderr or p.stdout).strip()[-300:]}
    body = json.loads(p.stdout)
    runs = body.get("runs") or []
    if not runs:
        return {"report_error": "no run in the report"}
    run = runs[0]
    first = run.get("first_nonfinite")
    return {
        "causes": [d.get("cause") for d in run.get("diagnosis") or []],
        "report_first_step": first.get("step") if isinstance(first, dict) else None,
        "early_warning": run.get("early_warning"),
    }


def score(results):
    halves = {}
    for half in HALVES:
        rs = [r for r in results if r["half"] == half]
        if not rs:
            continue
        blow = [r for r in rs if r["cause"] is not None]
        healthy = [r for r in rs if r["cause"] is None]
        stepped = [r for r in blow if r["counter_first_bad"] is not None]
        halves[half] = {
            "blowups": len(blow),
            "top1": sum(r["top1"] for r in blow),
            "top2": sum(r["top2"] for r in blow),
            "went_nonfinite_per_counter": len(stepped),
            "report_saw_nonfinite": sum(r.get("report_first_step") is not None for r in blow),
            "first_step_agrees": sum(r["step_agrees"] is True for r in stepped),
            "healthy": len(healthy),
            "false_alarms": sum(r["false_alarm"] for r in healthy),
            "healthy_progressed": sum(r["progressed"] is True for r in healthy),
        }
        replayed = [r for r in blow if "causes_after_replay" in r]
        if replayed:
            outcomes = [remedy_outcome(r) for r in replayed]
            halves[half].update(
                replayed=len(replayed),
                top1_after_replay=sum(
                    r["causes_after_replay"][:1] == [r["cause"]] for r in replayed
                ),
                remedy_applicable=sum(a for a, _ in outcomes),
                remedy_held=sum(h for a, h in outcomes if a),
            )
    return halves


def evaluate(only=None, keep=None, replay=False):
    base = keep or tempfile.mkdtemp(prefix="eval_causes_")
    results = []
    every = [(i, c, half(i)) for module, half in suites() for i, c in enumerate(module.CASES)]
    for i, c, half in every:
        if only and c.name not in only:
            continue
        logdir = os.path.join(base, c.name)
        r = {"index": i, "name": c.name, "cause": c.cause, "what": c.what, "half": half}
        r.update(train_case(c, logdir))
        r.update(read_report(logdir))
        causes = r.get("causes") or []
        if c.cause is None:
            r["false_alarm"] = bool(causes) or bool(r.get("early_warning"))
            fl, ll = r["first_loss"], r["last_loss"]
            r["progressed"] = (
                fl is not None and ll is not None and math.isfinite(ll) and ll < fl
            ) and r["counter_first_bad"] is None
        else:
            r["top1"] = causes[:1] == [c.cause]
            r["top2"] = c.cause in causes[:2]
            cf, rf = r["counter_first_bad"], r.get("report_first_step")
            r["step_agrees"] = None if cf is None else (rf == cf)
            if replay:
                r.update(replay_case(c, logdir + ".stop"))
        replayed = ""
        if "causes_after_replay" in r:
            applicable, held = remedy_outcome(r)
            replayed = " | replay %s: %s, remedy %s" % (
                r["replay_verdict"],
                ",".join(r["causes_after_replay"][:2]) or "-",
                ("held" if held else "failed") if applicable else "n/a",
            )
        elif r.get("replay_error"):
            replayed = " | replay error: %s" % r["replay_error"]
        print(
            "%-28s %-28s top: %-40s step counter=%s report=%s (%.0fs)%s%s"
            % (
                c.name,
                c.cause,
                ",".join(causes[:2]) or "-",
                r["counter_first_bad"],
                r.get("report_first_step"),
                r["seconds"],
                replayed,
                " ERROR " + (r["train_error"] or r.get("report_error", ""))
                if r["train_error"] or r.get("report_error")
                else "",
            ),
            flush=True,
        )
        results.append(r)
    return results, base


def pct(a, b):
    return "%d/%d (%.0f%%)" % (a, b, 100.0 * a / b) if b else "0/0"


def summary_table(halves):
    """The figures per half, as a markdown table (docs/causes.md and cause_evaluation.md)."""
    lines = [
        "Measured %s with `%s`." % (time.strftime("%Y-%m-%d", time.gmtime()), COMMAND),
        "",
        "| half | blow-ups | top-1 right | right in top 2 | top-1 right after the replay "
        "| its remedy kept the replayed step finite | first step = counter's | healthy runs "
        "| false alarms | healthy runs whose loss went down |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for half, h in halves.items():
        lines.append(
            "| %s | %d | %s | %s | %s | %s | %s | %d | %s | %s |"
            % (
                half,
                h["blowups"],
                pct(h["top1"], h["blowups"]),
                pct(h["top2"], h["blowups"]),
                pct(h["top1_after_replay"], h["replayed"]) if "replayed" in h else "-",
                pct(h["remedy_held"], h["remedy_applicable"]) if "replayed" in h else "-",
                pct(h["first_step_agrees"], h["went_nonfinite_per_counter"]),
                h["healthy"],
                pct(h["false_alarms"], h["healthy"]),
                pct(h["healthy_progressed"], h["healthy"]),
            )
        )
    lines += [
        "",
        "*tune*: the even cases of `cases.py`, which the rules were tuned on; *held-out*: its odd "
        "cases; *fresh*, *fresh 2*, *fresh 3*: `fresh_cases.py`, `fresh2_cases.py`, "
        "`fresh3_cases.py`, written by people who "
        "had not read the rules (see the page's text for when each was first scored). "
        "*Its remedy*: of the "
        "blow-ups whose first cause (after the replay) has a remedy the replay could apply "
        "mechanically (`replay_step.MECHANICAL`, not tried when the step went non-finite before "
        "the update it changes), how many stayed finite with one of its variants; *false "
        "alarms*: a cause or an early warning on a healthy run.",
    ]
    return "\n".join(lines)


def as_markdown(results, halves):
    lines = [BEGIN, "", summary_table(halves)]
    for half in ("held-out", "fresh", "fresh 2", "fresh 3"):
        shown = [r for r in results if r["half"] == half]
        if not shown:
            continue
        lines += [
            "",
            "The %s cases one by one (`counter`: the first bad global batch by the independent "
            "counter; `report`: `first_nonfinite.step` of `tb-nanwatch report --json`; after the "
            "replay: the first cause then, and whether one of its mechanical remedies held):"
            % half,
            "",
            "| case | what it does | intended cause | top-1 given | top-2 given | after the replay "
            "| first step counter / report |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in shown:
            lines.append(case_row(r))
    lines += ["", END]
    return "\n".join(lines)


def case_row(r):
    causes = r.get("causes") or []
    top1 = causes[0] if causes else "-"
    top2 = causes[1] if len(causes) > 1 else "-"
    if r["cause"] is None:
        ew = " + early warning" if r.get("early_warning") else ""
        top1 = (top1 + ew) if causes or ew else "- (no alarm)"
    mark = lambda ok: " ✓" if ok else ""  # noqa: E731
    after = "-"
    if "causes_after_replay" in r:
        applicable, held = remedy_outcome(r)
        first = (r["causes_after_replay"] or ["-"])[0]
        after = "`%s`%s, remedy %s" % (
            first,
            mark(first == r["cause"]),
            ("held" if held else "did not hold") if applicable else "not mechanical",
        )
    elif r.get("replay_error"):
        after = "replay failed: %s" % r["replay_error"].replace("|", "\\|")[:80]
    return "| `%s` | %s | %s | `%s`%s | `%s`%s | %s | %s / %s |" % (
        r["name"],
        r["what"].replace("|", "\\|"),
        "healthy" if r["cause"] is None else "`%s`" % r["cause"],
        top1,
        mark(r.get("top1")),
        top2,
        mark(r.get("top2") and not r.get("top1")),
        after,
        "-" if r["counter_first_bad"] is None else r["counter_first_bad"],
        "-" if r.get("report_first_step") is None else r["report_first_step"],
    )


def write_out(path, block):
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        help="a docs directory: replace the evaluation blocks of its cause_evaluation.md (case "
        "by case) and causes.md (the figures)",
    )
    ap.add_argument("--json", help="write the per-case results here")
    ap.add_argument("--only", help="comma-separated case names (a partial run scores only those)")
    ap.add_argument("--keep", help="train into this directory (default: a temp directory)")
    ap.add_argument(
        "--replay",
        action="store_true",
        help="also train each blow-up in stop mode, replay its failing step with the diagnosed "
        "causes' remedies and score the ranking after the replay and the first remedy",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.time()
    results, base = evaluate(only, args.keep, args.replay)
    halves = score(results)
    print(json.dumps(halves, indent=2))
    print("%.0f s" % (time.time() - t0))
    if args.keep:
        print("logdirs under %s" % base)
    else:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"halves": halves, "cases": results}, f, indent=2, default=str)
    if args.out:
        write_out(os.path.join(args.out, "cause_evaluation.md"), as_markdown(results, halves))
        causes_table.write_page(os.path.join(args.out, "causes.md"), summary_table(halves))


if __name__ == "__main__":
    main()
