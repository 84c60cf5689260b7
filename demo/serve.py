"""`make demo`: a first diagnosed run in TensorBoard within a minute or two, the rest while it serves.

    python demo/serve.py                     # F first, TensorBoard on 127.0.0.1:6006, then the rest
    python demo/serve.py --port 6007 --logdir /tmp/demo
    python demo/serve.py --runs f_huge_data,a_unscaled_inputs   # only these runs

What it does, in this order:
1. starts TensorBoard on HOST:PORT at once (it takes seconds to come up; the logdir may
   still be empty);
2. trains the first run (the article's scenario F, a blow-up at step 3 that trains in a few
   seconds) at normal priority, and says when it is there to look at;
3. trains the remaining runs in the background at a lower priority (`nice`), so that the tab
   stays responsive; TensorBoard picks each new run up on its next reload.
Runs whose logs exist are reused (`make demo-retrain` trains them again).

Ctrl-C (or SIGTERM) stops TensorBoard and the training, each with its process group
(TensorBoard's data server and the training process included).  When TensorBoard exits on
its own (say, the port is taken), the training is stopped too and the exit status is its.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ALL = os.path.join(HERE, "run_all.py")
DEFAULT_LOGDIR = os.path.join(HERE, "logs")
FIRST_RUN = "f_huge_data"
BACKGROUND_NICENESS = 10


def _tensorboard_command(logdir, host, port):
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.exists(tensorboard):  # a Python without its scripts next to it
        tensorboard = None
    base = [tensorboard] if tensorboard else [sys.executable, "-m", "tensorboard.main"]
    return base + ["--logdir", logdir, "--host", host, "--port", str(port)]


def _stop(proc, name):
    """Terminates `proc`'s process group (it was started in a session of its own), then
    kills it if it does not go within 10 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            print("demo: %s did not stop on %s" % (name, sig.name), file=sys.stderr, flush=True)


class Training(threading.Thread):
    """The first run at normal priority, then the others niced, one process each."""

    def __init__(self, logdir, first, rest, url, retrain):
        super().__init__(daemon=True)
        self.logdir, self.first, self.rest, self.url, self.retrain = (
            logdir,
            first,
            rest,
            url,
            retrain,
        )
        self.proc = None
        self.stopping = False
        self.first_ready = None  # seconds from start to the first run on disk
        self.status = None
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def _run(self, names, niceness):
        args = [sys.executable, RUN_ALL, "--logdir", self.logdir, "--only", ",".join(names)]
        if self.retrain:
            args.append("--retrain")
        with self._lock:
            if self.stopping:
                return None
            self.proc = subprocess.Popen(
                args,
                start_new_session=True,  # Ctrl-C reaches us; we stop it, with no traceback
                preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            )
        return self.proc.wait()

    def run(self):
        if self.first:
            status = self._run(self.first, 0)
            if status is None or self.stopping:
                return
            self.first_ready = time.monotonic() - self._t0
            print(
                "\ndemo: %s is ready (%.0f s): open %s/#nanwatch%s\n"
                % (
                    ", ".join(self.first),
                    self.first_ready,
                    self.url,
                    "; %d more run(s) train in the background, reload to see them" % len(self.rest)
                    if self.rest
                    else "",
                ),
                flush=True,
            )
            self.status = status
        if self.rest:
            status = self._run(self.rest, BACKGROUND_NICENESS)
            if status is None or self.stopping:
                return
            self.status = max(self.status or 0, status)
            print(
                "\ndemo: all %d runs trained; TensorBoard goes on serving at %s (Ctrl-C stops it)\n"
                % (len(self.first) + len(self.rest), self.url),
                flush=True,
            )

    def stop(self):
        with self._lock:
            self.stopping = True
        _stop(self.proc, "the training")


def _run_names(spec):
    sys.path.insert(0, HERE)
    import scenarios

    if not spec:
        return list(scenarios.REGISTRY)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in scenarios.REGISTRY]
    if unknown:
        raise SystemExit("demo: unknown run(s) %s; see demo/run_all.py --list" % ", ".join(unknown))
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 6006))
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR)
    parser.add_argument("--runs", help="comma-separated runs to train (default: every demo run)")
    parser.add_argument(
        "--first", default=FIRST_RUN, help="the run trained first (default %s)" % FIRST_RUN
    )
    parser.add_argument("--retrain", action="store_true", help="train every run again")
    args = parser.parse_args(argv)

    names = _run_names(args.runs)
    first = [args.first] if args.first in names else names[:1]
    rest = [n for n in names if n not in first]
    os.makedirs(args.logdir, exist_ok=True)
    url = "http://%s:%d" % (args.host, args.port)

    # SIGTERM and SIGHUP stop the demo as Ctrl-C does.  SIGINT too, set here because a
    # shell without job control starts background commands with SIGINT ignored.
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    print(
        "demo: TensorBoard on %s (logdir %s); training %s first, then %d more run(s)"
        % (url, args.logdir, ", ".join(first), len(rest)),
        flush=True,
    )
    tensorboard = subprocess.Popen(
        _tensorboard_command(args.logdir, args.host, args.port),
        start_new_session=True,  # its data server child goes with its group
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    training = Training(args.logdir, first, rest, url, args.retrain)
    training.start()
    try:
        status = tensorboard.wait()
        print("demo: TensorBoard exited with status %d" % status, file=sys.stderr, flush=True)
        return status or 1
    except KeyboardInterrupt:
        print("\ndemo: stopping TensorBoard and the training", file=sys.stderr, flush=True)
        return 130
    finally:
        training.stop()
        _stop(tensorboard, "TensorBoard")


if __name__ == "__main__":
    sys.exit(main())
