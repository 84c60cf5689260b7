"""`tb-nanwatch`: the command line.

    tb-nanwatch report LOGDIR [--json] [--png FILE] [--run RUN]

Exit status: 0 no run has a non-finite value, 1 one does, 2 error.  Never
imports TensorFlow: TensorBoard's loader is told to use its own TensorFlow stub.
"""

import argparse
import logging
import os
import sys
import threading
import time
import types

EXIT_FINITE, EXIT_NONFINITE, EXIT_ERROR = 0, 1, 2
PROG = "tb-nanwatch"


def _no_tensorflow():
    """Makes TensorBoard use its TensorFlow stub even where TensorFlow is installed.

    `tensorboard.compat.tf` picks the stub when `tensorboard.compat.notf` is importable
    (TensorBoard's own //tensorboard/compat:no_tensorflow target).  Importing TensorFlow
    would cost seconds and, on a GPU server, grab devices; reading event files needs none of it
    (`tb_nanwatch.eventfile` reads them, with google-crc32c's C checksums)."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


# Bytes of event files read so far: the progress bar's measure.
BYTES_CHECKED = [0]


EXIT_STATUS_WORDS = (
    "Exit status: 0 every run read is finite; 1 at least one run has a non-finite value; "
    "2 error (bad arguments, no nanwatch data, or a run that could not be read while none "
    "is non-finite); 130 interrupted (Ctrl-C)."
)


class UsageError(Exception):
    """A one-line message for stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s (see %s --help)" % (message, self.prog))


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("expected a whole number >= 0, got %r" % text)
    return value


def build_parser():
    import tb_nanwatch
    from tb_nanwatch import stats

    parser = _Parser(
        prog=PROG,
        description="Where did TensorFlow training first go NaN or Inf?",
        epilog=EXIT_STATUS_WORDS,
    )
    parser.add_argument(
        "--version", action="version", version="%s %s" % (PROG, tb_nanwatch.__version__)
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    rep = sub.add_parser(
        "report",
        help="postmortem of a logdir written by NanWatchCallback",
        description="Postmortem of a logdir written by tb_nanwatch: per run, the first NaN/Inf value "
        "(the producer), the sites it reached in the same step, and the producer's statistics "
        "over the steps before it.",
        epilog=EXIT_STATUS_WORDS,
    )
    rep.add_argument(
        "logdir", metavar="LOGDIR", help="the logdir given to NanWatchCallback (or a parent of it)"
    )
    rep.add_argument(
        "--json",
        action="store_true",
        help='print {"runs": [{"run", "first_nonfinite", ...}]} on stdout and nothing else',
    )
    rep.add_argument(
        "--png",
        metavar="FILE",
        help="also write the heatmap (sites x steps) of one run as a PNG image: the --run, "
        "else the first run with a non-finite value, else the first run",
    )
    rep.add_argument(
        "--run",
        metavar="RUN",
        action="append",
        help="only this run (path relative to LOGDIR, as listed in the report); repeatable",
    )
    rep.add_argument(
        "--stat",
        metavar="NAME",
        choices=stats.STAT_NAMES,
        help="statistic the PNG shows (default max_abs; norm, measured at every step, for a run killed before its "
        "first row); one of: %s" % ", ".join(stats.STAT_NAMES),
    )
    rep.add_argument(
        "--kind",
        metavar="KIND",
        choices=stats.KINDS,
        help="PNG: only sites of this kind; one of: %s" % ", ".join(stats.KINDS),
    )
    rep.add_argument(
        "--steps",
        metavar="N",
        type=_count,
        default=12,
        help="trend table: the last N steps up to the first non-finite one (default 12; 0: all)",
    )
    rep.add_argument(
        "--propagators",
        metavar="N",
        type=_count,
        default=10,
        help="list at most N propagators per run (default 10; 0: all)",
    )
    replay = sub.add_parser(
        "replay",
        help="run a stop-mode run's failing step again from its repro bundle (needs TensorFlow)",
        description="Restores the repro bundle that on_nonfinite='stop' wrote into RUN_DIR, runs "
        "that one step again eagerly, and says whether the same site goes non-finite "
        "(reproducible, not_reproducible: a transient fault, or xla_only), which op, and at which "
        "line of your code.  The result is kept in RUN_DIR for the report and the tab.",
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run directory holding the bundle")
    replay.add_argument("--json", action="store_true", help="print the result as JSON")
    replay.add_argument(
        "--custom-objects",
        metavar="MODULE",
        help="a module of yours whose classes and functions the model needs to be rebuilt "
        "(its public names are passed as custom_objects; the model is loaded in safe mode)",
    )
    return parser


# -- progress -------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr while the logdir loads (only on a terminal):
    bytes of event records read out of the logdir's total, then runs read."""

    FRAMES = "|/-\\"

    def __init__(self, enabled, total_runs, total_bytes):
        self.enabled = enabled
        self.total = total_runs
        self.bytes = total_bytes
        self.done = 0
        self.phase = "loading"
        self._stop = threading.Event()
        self._thread = None
        self._start = time.time()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def print(self, out, text):
        """A line on stdout while the bar runs on stderr: the bar's line is cleared first
        (it redraws itself on its next tick)."""
        if self._thread is not None:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        try:
            out.write(text + "\n")
            out.flush()
        except BrokenPipeError:  # `| head`: the reader left; the verdict still holds
            _silence_stdout()

    def step(self, phase=None):
        self.done += 1
        if phase:
            self.phase = phase

    def line(self, frame=0):
        width = 24
        if self.phase == "loading":
            read = min(BYTES_CHECKED[0], self.bytes)
            frac = read / self.bytes if self.bytes else 0.0
            counts = "%.1f/%.1f MB" % (read / 1e6, self.bytes / 1e6)
        else:
            frac = min(self.done, self.total) / self.total if self.total else 0.0
            counts = "%d/%d runs" % (min(self.done, self.total), self.total)
        filled = int(width * frac)
        return "%s %s %s [%s%s] %s, %.0fs" % (
            PROG,
            self.phase,
            self.FRAMES[frame % 4],
            "#" * filled,
            "." * (width - filled),
            counts,
            time.time() - self._start,
        )

    def _loop(self):
        i = 0
        while True:
            sys.stderr.write("\r\033[K" + self.line(i))
            sys.stderr.flush()
            i += 1
            if self._stop.wait(0.1):
                break


# -- report -------------------------------------------------------------------------
def _normalise_run(logdir, run):
    if os.path.isabs(run):
        run = os.path.relpath(run, logdir)
    run = os.path.normpath(run)
    return run


def _shown_name(logdir, run):
    """The run as the report names it: relative to LOGDIR, except LOGDIR itself (the loader's
    "."), which is named by its directory, as a user calls it."""
    if run != ".":
        return run
    return os.path.basename(os.path.normpath(os.path.abspath(logdir))) or logdir


def _check_png_path(path):
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise UsageError("--png %s: is a directory" % path)
    if not os.path.isdir(parent):
        raise UsageError("--png %s: directory %s does not exist" % (path, parent))
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise UsageError("--png %s: not writable" % path)
    if not os.path.exists(target) and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError("--png %s: directory %s is not writable" % (path, parent))


def run_report(args, out, err):
    """`tb-nanwatch report`: check the arguments, read every run (a summary line each as it
    is read), write the PNG, say the warnings, then the details (text or JSON)."""
    _check_report_args(args)
    _no_tensorflow()
    loaded = _read_runs(args, out, err)
    png_note = _write_png(args, loaded.reports)
    _warn_runs(err, loaded.problems)
    _warn_runs(err, loaded.other_damage)
    try:
        if args.json:
            _write_json(out, loaded)
        else:
            _write_text(out, args, loaded, png_note)
        if png_note and args.json:
            err.write("%s: %s\n" % (PROG, png_note))
        out.flush()
    except BrokenPipeError:
        # `tb-nanwatch report logs | head`: the reader left; the verdict below still holds.
        _silence_stdout()
    if any(r.first is not None for r in loaded.reports):
        return EXIT_NONFINITE
    if loaded.unreadable:
        return EXIT_ERROR
    return EXIT_FINITE


def _check_report_args(args):
    if not os.path.exists(args.logdir):
        raise UsageError("%s: no such directory" % args.logdir)
    if not os.path.isdir(args.logdir):
        raise UsageError("%s: not a directory (give the logdir, not an event file)" % args.logdir)
    if args.png:
        _check_png_path(args.png)


class _Loaded:
    """What _read_runs found: the runs asked for, a RunReport per readable (run, group),
    warnings per run, and damage in directories without nanwatch data."""

    def __init__(self, runs, reports, problems, other_damage):
        self.runs, self.reports, self.problems, self.other_damage = (
            runs,
            reports,
            problems,
            other_damage,
        )
        self.unreadable = [run for run in runs if not any(r.run == run for r in reports)]


def _read_runs(args, out, err):
    """Every run, one at a time: its files read block by block into a bounded view, its
    report made, then only the report kept (and the view of the run the PNG will show), so
    a sweep of hundreds of runs costs what one run costs."""
    from tb_nanwatch import eventfile, metadata, report, runview

    logdir = args.logdir
    found = eventfile.find_runs(logdir)
    n_bytes = sum(_size(p) for paths in found.values() for p in paths)
    if not found:
        raise UsageError("%s: no TensorBoard event files in it or below it" % logdir)
    shown = {run: _shown_name(logdir, run) for run in found}
    if args.run:
        by_shown_name = {name: run for run, name in shown.items() if name != run}
        wanted = [_normalise_run(logdir, r) for r in args.run]
        wanted = [by_shown_name.get(r, r) if r not in found else r for r in wanted]
        unknown = [r for r in wanted if r not in found]
        if unknown:
            raise UsageError(
                "no nanwatch run %s in %s; runs: %s"
                % (
                    ", ".join(repr(r) for r in unknown),
                    logdir,
                    ", ".join(shown[r] for r in sorted(found)),
                )
            )
        found = {r: found[r] for r in dict.fromkeys(wanted)}
    progress = Progress(not args.json and err.isatty(), len(found), n_bytes)
    runs, reports, problems, other_damage = [], [], {}, {}
    png_run = None  # the report whose view the PNG needs
    done_bytes = 0
    with progress:
        progress.total, progress.done, progress.phase = len(found), 0, "reading"
        header = "tb-nanwatch report %s: %d run%s" % (
            report.clean(logdir),
            len(found),
            "" if len(found) == 1 else "s",
        )
        for run in found if args.run else sorted(found):
            name = shown[run]
            source = runview.RunSource(name, os.path.join(logdir, run))
            try:
                source.refresh()
            except metadata.MetadataError as e:
                problems.setdefault(name, []).append("unreadable nanwatch data: %s" % e)
                runs.append(name)
                progress.step()
                continue
            done_bytes += source.files.bytes_read
            BYTES_CHECKED[0] = done_bytes
            groups = source.groups()
            damage = source.files.damage()
            if not groups:
                if damage:
                    other_damage[name] = damage
                progress.step()
                continue
            runs.append(name)
            for group in groups:
                where = "" if group is None else " (group %s)" % group
                try:
                    view = source.view(group)
                except (runview.RunNotFound, runview.InvalidData, metadata.MetadataError) as e:
                    problems.setdefault(name, []).append(
                        "unreadable nanwatch data%s: %s" % (where, e)
                    )
                    continue
                problems.setdefault(name, []).extend("%s%s" % (w, where) for w in view.warnings)
                if view.session_warning():
                    problems[name].append(view.session_warning() + where)
                try:
                    rep = report.RunReport(view)
                    rep.freeze(max_propagators=args.propagators, trend_steps=args.steps)
                    if png_run is None or (png_run.first is None and rep.first is not None):
                        if png_run is not None:
                            png_run.release()
                        png_run = rep
                    else:
                        rep.release()
                    reports.append(rep)
                    if not args.json:
                        if header:  # said once the first run with nanwatch data is read
                            progress.print(out, header)
                            header = None
                        progress.print(out, "  " + rep.summary_line())
                except Exception as e:  # a bug, not bad data (the gate took that): say so, go on
                    if os.environ.get("TB_NANWATCH_DEBUG"):
                        raise
                    problems[name].append(
                        "internal error%s: %s: %s (please report it)" % (where, type(e).__name__, e)
                    )
            problems[name] = damage + problems.get(name, [])
            del source
            progress.step()
    if not runs:
        _warn_runs(err, other_damage)
        raise UsageError(
            "%s: no nanwatch data (%d run%s of TensorBoard event files, none written by "
            "tb_nanwatch%s)"
            % (
                logdir,
                len(found),
                "" if len(found) == 1 else "s",
                "; damaged files named above" if other_damage else "",
            )
        )
    if args.run:
        other_damage = {}
    return _Loaded(runs, reports, problems, other_damage)


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _write_png(args, reports):
    """--png: the first run with a non-finite value (else the first run); the note to print."""
    from tb_nanwatch import heatmap, report

    if not args.png:
        return None
    # The run _read_runs kept the view of: the first with a non-finite value, else the first.
    kept = [r for r in reports if r.data is not None]
    rep = kept[0] if kept else None
    if rep is None:
        return None
    if args.kind and not any(s["kind"] == args.kind for s in rep.data.sites):
        raise UsageError(
            "--kind %s: run %s has no site of that kind" % (args.kind, report.clean(rep.run))
        )
    try:
        size, stat = report.render_png(rep, args.png, stat=args.stat, kind=args.kind)
    except OSError as e:
        raise UsageError("--png %s: %s" % (args.png, e.strerror or e))
    except heatmap.HeatmapError as e:
        raise UsageError("--png: %s" % e)
    return "wrote %s (%dx%d, run %s, %s)" % (
        args.png,
        size[0],
        size[1],
        report.clean(rep.run),
        stat,
    )


def _write_json(out, loaded):
    import json

    from tb_nanwatch import report

    entries = report.merge_groups(loaded.reports)
    for e in entries:
        if loaded.problems.get(e["run"]):
            e["warnings"] = loaded.problems[e["run"]]
    for run in loaded.unreadable:
        entries.append(
            {"run": run, "first_nonfinite": None, "error": "; ".join(loaded.problems.get(run, []))}
        )
    body = {"runs": entries}
    if loaded.other_damage:
        body["damaged_without_nanwatch_data"] = loaded.other_damage
    out.write(json.dumps(body, indent=2, allow_nan=False) + "\n")


def _write_text(out, args, loaded, png_note):
    from tb_nanwatch import report

    n_bad = len({r.run for r in loaded.reports if r.first is not None})
    out.write(
        "%d of %d run%s with a non-finite value\n"
        % (n_bad, len(loaded.runs), "" if len(loaded.runs) == 1 else "s")
    )
    for rep in loaded.reports:
        out.write("\n" + "\n".join(rep.text()) + "\n")
    for run in loaded.unreadable:
        out.write("\nrun %s: could not be read (see the warnings on stderr)\n" % report.clean(run))
    if png_note:
        out.write("\n%s\n" % png_note)


def _warn_runs(err, messages):
    from tb_nanwatch import report

    for run, msgs in messages.items():
        for msg in msgs:
            err.write("%s: warning: run %s: %s\n" % (PROG, report.clean(run), report.clean(msg)))


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


_log_handler = logging.StreamHandler()


def run_replay(args, out):
    """`tb-nanwatch replay RUN_DIR`: exit 1 when the step went non-finite again, 0 when not."""
    import importlib
    import json

    import tb_nanwatch
    from tb_nanwatch import bundle, failing_step, replay_step

    if not os.path.isdir(args.run_dir):
        raise UsageError("%s: no such directory" % args.run_dir)
    custom = None
    if args.custom_objects:
        try:
            module = importlib.import_module(args.custom_objects)
        except ImportError as e:
            raise UsageError("--custom-objects %s: %s" % (args.custom_objects, e))
        custom = {k: v for k, v in vars(module).items() if not k.startswith("_") and callable(v)}
    try:
        result = tb_nanwatch.replay(args.run_dir, custom_objects=custom).as_json()
    except (bundle.BundleError, replay_step.ReplayError) as e:
        raise UsageError(str(e))
    except (TypeError, ValueError) as e:
        if "Could not locate" not in str(e):
            raise
        # Keras could not rebuild the model: a layer or function of the user's own code.
        missing = str(e).split("Could not locate", 1)[1].split(".")[0].strip()
        raise UsageError(
            "the bundle's model needs your code to be rebuilt (could not locate %s): name the "
            "module that defines it, tb-nanwatch replay %s --custom-objects MODULE"
            % (missing, args.run_dir)
        )
    if args.json:
        out.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        site = result.get("site") or {}
        out.write("step %s replayed from its bundle: %s\n" % (result["step"], result["verdict"]))
        if site:
            out.write(
                "  first non-finite: %s\n"
                % " ".join(
                    p for p in (site.get("layer"), site.get("kind"), site.get("tensor")) if p
                )
            )
        if result.get("op"):
            out.write("  op: %s\n" % failing_step.op_words(result["op"]))
        if result.get("input"):
            out.write("  in the batch: %s\n" % json.dumps(result["input"], default=str))
        for words in failing_step.remedy_words(result):
            out.write("  remedy on replay: %s\n" % words)
        for note in result.get("notes", []):
            out.write("  note: %s\n" % note)
    out.flush()
    return EXIT_NONFINITE if result.get("site") else EXIT_FINITE


def main(argv=None):
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    # TensorBoard's loader logs at INFO/WARNING about every file it opens; our own
    # warnings are printed one line each below.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    _log_handler.setStream(err)  # one handler however often main() runs in a process
    _log_handler.setFormatter(logging.Formatter(PROG + ": warning: %(message)s"))
    logging.getLogger("tb_nanwatch").addHandler(_log_handler)
    logging.getLogger("tb_nanwatch").propagate = False
    try:
        args = build_parser().parse_args(argv)
        if args.command == "report":
            return run_report(args, out, err)
        if args.command == "replay":
            return run_replay(args, out)
        raise UsageError("unknown command %r" % args.command)  # pragma: no cover - argparse checks
    except UsageError as e:
        err.write("%s: error: %s\n" % (PROG, e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("%s: interrupted\n" % PROG)
        return 130
    except Exception as e:  # never a traceback for a user; TB_NANWATCH_DEBUG=1 shows it
        if os.environ.get("TB_NANWATCH_DEBUG"):
            raise
        err.write(
            "%s: error: %s: %s (set TB_NANWATCH_DEBUG=1 for a traceback)\n"
            % (PROG, type(e).__name__, e)
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
