"""The files of one run directory, read a piece at a time and only once.  TensorFlow-free.

A run's nanwatch records live in its event files (`*tfevents*`: the small records, and the
rows of logs written before protocol 3) and in its row files (`plugins/nanwatch/*.rows`,
protocol 3: the rows and flight rows, which TensorBoard's loaders never see).  Both are
TFRecord files of `Event` protos.

`RunFiles.read_new()` reads what was appended to them since the last call (a live run
costs the reload of its new rows, not of the run), in chunks (a 3 GB file never sits in
memory whole), past damage as `eventfile` does: every frame is checked against its two
checksums and against the bytes the file holds before anything is allocated; a damaged
frame is skipped and reading resynchronises on the next frame that verifies.  An
incomplete last frame is left for the next call (its writer may still be writing it).
"""

import os

from google.protobuf import message as pb_message
from tensorboard.compat.proto import event_pb2

from tb_nanwatch import eventfile

# Where protocol 3 writes rows, below the run directory (TensorBoard keeps plugin files
# under plugins/<name>/; no `tfevents` in the name, so no loader reads them).
ROWS_DIR = os.path.join("plugins", "nanwatch")
ROWS_SUFFIX = ".rows"
CHUNK_BYTES = 32 * 2**20

_HEADER, _FOOTER = eventfile.HEADER_BYTES, eventfile.FOOTER_BYTES


def run_files(run_dir):
    """The run's files in the order they are read: event files, then row files, each by
    name (a writer's files are named by the time it started, so sessions come in order)."""
    out = []
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(run_dir, name)
        if eventfile.is_event_file(name) and os.path.isfile(path):
            out.append(path)
    rows_dir = os.path.join(run_dir, ROWS_DIR)
    try:
        names = sorted(os.listdir(rows_dir))
    except OSError:
        names = []
    out.extend(
        os.path.join(rows_dir, n)
        for n in names
        if n.endswith(ROWS_SUFFIX) and os.path.isfile(os.path.join(rows_dir, n))
    )
    return out


class _File:
    """How far one file has been read, and its damage so far."""

    def __init__(self, path, chunk_bytes=CHUNK_BYTES):
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.offset = 0  # everything before it has been read (or skipped as damage)
        self.damage = eventfile.FileDamage(path, 0)
        self.pending = None  # an incomplete last frame: (offset, problem) if the file ends there

    def read_new(self):
        """Yields (offset, Event) of the frames appended since the last call."""
        try:
            f = open(self.path, "rb")
        except OSError as e:
            self.damage.add(self.offset, "unreadable: %s" % (e.strerror or e))
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.damage.size = size
            if size < self.offset:  # rewritten shorter: start again
                self.offset = 0
            f.seek(self.offset)
            self.pending = None
            base, buf = self.offset, b""
            while True:
                chunk = f.read(min(self.chunk_bytes, max(0, size - base - len(buf))))
                buf = memoryview(bytes(buf) + chunk)
                more = size - base - len(buf)  # bytes of the file after `buf`
                pos = 0
                while pos < len(buf):
                    status, end, problem = eventfile.frame_at(buf, pos, more)
                    if status == eventfile.FRAME_NEED_MORE:
                        break
                    if status == eventfile.FRAME_OK:
                        event = self._event(buf, pos, end, base)
                        if event is not None:
                            yield base + pos, event
                        pos = end
                        continue
                    if problem.startswith("truncated") and not more:
                        nxt = eventfile.resync(buf, pos + 1, more)
                        if nxt >= len(buf):
                            # An incomplete last frame: maybe still being written; read it
                            # again next time.
                            self.pending = (base + pos, problem)
                            self.offset = base + pos
                            return
                        # A length field that runs past the end, with whole frames after
                        # it: damage (said in the same words), not the end of the file.
                    if base + pos == 0 and problem.startswith("bad record header"):
                        problem = "not a readable event file (bad first record header)"
                    self.damage.add(base + pos, problem)
                    nxt = eventfile.resync(buf, pos + 1, more)
                    self.damage.skipped_bytes += nxt - pos
                    pos = nxt
                base, buf = base + pos, buf[pos:]
                self.offset = base
                if not more:
                    return
                if not chunk:  # the file shrank while being read
                    return

    def _event(self, buf, pos, end, base):
        self.damage.records += 1
        try:
            return event_pb2.Event.FromString(buf[pos + _HEADER : end - _FOOTER])
        except (pb_message.DecodeError, RecursionError, ValueError) as e:
            what = str(e) or type(e).__name__
            self.damage.add(base + pos, "record is not a TensorBoard event (%s)" % what)
            return None

    def damage_words(self):
        """The file's damage in one line, counting an incomplete last frame only when the
        file has not changed for eventfile.LIVE_SECONDS (else its writer may be at it)."""
        words = self.damage.words()
        if self.pending is not None:
            import time

            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                age = None
            if age is not None and age < eventfile.LIVE_SECONDS:
                pending = "%s (the file changed %.0f s ago: its writer may still be writing it)" % (
                    self.pending[1],
                    max(age, 0),
                )
            else:
                pending = self.pending[1]
            words = pending if words is None else "%s; %s" % (words, pending)
        return words


class RunFiles:
    """The files of one run directory and how far each has been read."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._files = {}  # path -> _File

    def paths(self):
        return run_files(self.run_dir)

    def fingerprint(self):
        """What changes when any of the run's files does: (name, size, mtime) of each."""
        out = []
        for path in self.paths():
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def read_new(self):
        """Yields (path, offset, Event) of every record appended since the last call."""
        for path in self.paths():
            state = self._files.get(path)
            if state is None:
                state = self._files[path] = _File(path)
            for offset, event in state.read_new():
                yield path, offset, event

    @property
    def bytes_read(self):
        return sum(f.offset for f in self._files.values())

    def damage(self):
        """One line per damaged file: `name: what`."""
        out = []
        for path, state in sorted(self._files.items()):
            words = state.damage_words()
            if words:
                out.append("%s: %s" % (os.path.relpath(path, self.run_dir), words))
        return out


def last_row_step(run_dir, group=None):
    """The step of the last logged row of (run, group) in its newest row file, from the
    file's head and tail only (for a runs overview), or None."""
    edges = edge_rows(run_dir, group)
    return None if not edges else int(edges[-1][2].step)


def edge_rows(run_dir, group=None, max_bytes=16 * 2**20):
    """[(path, offset, Event)] of the first logged row (it carries the site list) and the
    last one of (run, group) in the newest row file, reading its head and tail only; None
    when there are none."""
    from tb_nanwatch import metadata

    paths = [p for p in run_files(run_dir) if p.endswith(ROWS_SUFFIX)]
    if not paths:
        return None
    path = paths[-1]

    def rows_of(events):
        return [
            (offset, e)
            for offset, e in events
            if any(
                (metadata.parse_block_tag(v.tag) or (None, None))[:2] == (group, metadata.ROWS)
                for v in e.summary.value
            )
        ]

    try:
        head = _File(path, chunk_bytes=256 * 2**10)
        first = None
        for offset, event in head.read_new():
            if rows_of([(offset, event)]):
                first = (offset, event)
                break
        if first is None:
            return None
        size = os.path.getsize(path)
        tail = 64 * 2**10
        with open(path, "rb") as f:
            while True:
                start = max(0, size - tail)
                f.seek(start)
                buf = memoryview(f.read(size - start))
                pos = 0 if start == 0 else eventfile.resync(buf, 0, 0)
                events = []
                while pos < len(buf):
                    status, end, _ = eventfile.frame_at(buf, pos, 0)
                    if status != eventfile.FRAME_OK:
                        pos = eventfile.resync(buf, pos + 1, 0)
                        continue
                    events.append(
                        (
                            start + pos,
                            event_pb2.Event.FromString(buf[pos + _HEADER : end - _FOOTER]),
                        )
                    )
                    pos = end
                last = rows_of(events)
                if last or start == 0 or tail >= max_bytes:
                    break
                tail *= 4
    except (OSError, pb_message.DecodeError):
        return None
    out = [(path,) + first]
    if last and last[-1][0] != first[0]:
        out.append((path,) + last[-1])
    return out
