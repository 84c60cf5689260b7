"""Reads TensorBoard event files without TensorFlow, past any damage.  The CLI's loader.

An event file is a sequence of TFRecord frames:

    uint64 length | uint32 masked CRC-32C of length | data[length] | uint32 masked CRC-32C of data

TensorBoard's readers stop at the first bad frame (RustBoard and TensorFlow's reader can
even abort on a huge length field).  A postmortem tool must read what is intact, so here:

* every length is checked against what remains of the file before anything is read
  (the file is read whole, once: a length of 2**62 is damage, never an allocation);
* a frame whose length or data checksum fails is skipped, and reading resynchronises
  on the next position where a whole frame verifies (both checksums);
* every damaged place is remembered as (file, byte offset, what), and `FileDamage.words`
  says it in one line per file.

`LogdirProvider` serves the records of a logdir through TensorBoard's `DataProvider`
interface (`list_tensors` / `read_tensors`), so `reader.py` reads the CLI's view exactly
as it reads the plugin's.
"""

import collections
import logging
import os
import struct
import time

import google_crc32c
import numpy as np
from google.protobuf import message as pb_message
from tensorboard.compat.proto import event_pb2
from tensorboard.data import provider as tb_provider
from tensorboard.util import tensor_util

logger = logging.getLogger(__name__)

HEADER_BYTES = 12  # length + its checksum
FOOTER_BYTES = 4  # checksum of the data
# Resynchronisation looks at this many candidate positions at a time (numpy, see _candidates).
_SCAN_CHUNK = 1 << 20

# -- CRC-32C -------------------------------------------------------------------------
# google-crc32c: Google's C library (hardware CRC instructions where the CPU has them),
# with a pure-Python fallback when its extension cannot load.  Which one loaded matters
# (tens of MB/s vs GB/s), so it is checked here once and said in `CRC_IMPLEMENTATION`.
CRC_IMPLEMENTATION = google_crc32c.implementation
if google_crc32c.value(b"123456789") != 0xE3069283:  # the CRC-32C check value (RFC 3720)
    raise ImportError("google_crc32c (%s) computes a wrong CRC-32C" % CRC_IMPLEMENTATION)


def masked_crc32c(data):
    """The checksum TFRecord stores: CRC-32C rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_table():
    poly = np.uint32(0x82F63B78)
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> np.uint32(1)) ^ poly, table >> np.uint32(1)).astype(
            np.uint32
        )
    return table


_TABLE = _crc32c_table()


def _candidates(buf, start, stop):
    """Offsets p in [start, stop) whose 8 bytes at p checksum to the 4 bytes at p + 8:
    where a frame may start.  All offsets of a chunk at once (a byte-at-a-time loop would
    read a few hundred KB/s of a zero-filled tail); each candidate is then checked whole
    with the library's CRC."""
    out = []
    data = np.frombuffer(buf, dtype=np.uint8)
    for lo in range(start, stop, _SCAN_CHUNK):
        hi = min(stop, lo + _SCAN_CHUNK)
        if hi + HEADER_BYTES > len(data):
            hi = len(data) - HEADER_BYTES + 1
        if hi <= lo:
            break
        n = hi - lo
        crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
        for k in range(8):
            crc = _TABLE[(crc ^ data[lo + k : lo + k + n]) & 0xFF] ^ (crc >> np.uint32(8))
        crc ^= np.uint32(0xFFFFFFFF)
        masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
        stored = (
            data[lo + 8 : lo + 8 + n].astype(np.uint32)
            | (data[lo + 9 : lo + 9 + n].astype(np.uint32) << np.uint32(8))
            | (data[lo + 10 : lo + 10 + n].astype(np.uint32) << np.uint32(16))
            | (data[lo + 11 : lo + 11 + n].astype(np.uint32) << np.uint32(24))
        )
        out.extend((np.nonzero(masked == stored)[0] + lo).tolist())
        if out:
            return out
    return out


# -- frames --------------------------------------------------------------------------
class FileDamage:
    """What was wrong with one file: [(byte offset, what)], and how much was skipped."""

    def __init__(self, path, size):
        self.path = path
        self.size = size
        self.places = []
        self.skipped_bytes = 0
        self.records = 0  # intact records read

    def add(self, offset, what):
        self.places.append((offset, what))

    def __bool__(self):
        return bool(self.places)

    def words(self):
        """One line: the first damaged place in words, and how much else there was."""
        if not self.places:
            return None
        offset, what = self.places[0]
        more = len(self.places) - 1
        return "%s at byte %d%s; %d intact record%s read, %d byte%s skipped" % (
            what,
            offset,
            "" if not more else " (and %d more damaged place%s)" % (more, "" if more == 1 else "s"),
            self.records,
            "" if self.records == 1 else "s",
            self.skipped_bytes,
            "" if self.skipped_bytes == 1 else "s",
        )


FRAME_OK, FRAME_NEED_MORE, FRAME_BAD = "ok", "need more", "bad"


def frame_at(buf, pos, more_in_file=0):
    """(status, end, problem) of the frame at `pos` of `buf`, with `more_in_file` bytes of the
    file after `buf` (0: `buf` ends where the file does): FRAME_OK with the frame's end,
    FRAME_NEED_MORE when the frame runs past `buf` but not past the file, FRAME_BAD with the
    problem in words.  Lengths are checked against what the file holds before anything is read."""
    left = len(buf) - pos
    if left < HEADER_BYTES:
        if more_in_file > 0:
            return FRAME_NEED_MORE, None, None
        return FRAME_BAD, None, "truncated: the last record is incomplete"
    length, length_crc = struct.unpack_from("<QI", buf, pos)
    if masked_crc32c(buf[pos : pos + 8]) != length_crc:
        return FRAME_BAD, None, "bad record header (length checksum)"
    end = pos + HEADER_BYTES + length
    if end + FOOTER_BYTES > len(buf):
        if length <= left + more_in_file - HEADER_BYTES - FOOTER_BYTES:
            return FRAME_NEED_MORE, None, None
        # A checksummed length that runs past the end: the file was cut inside this record.
        return (
            FRAME_BAD,
            None,
            "truncated: the last record is incomplete (it claims %d bytes, %d remain)"
            % (length, left + more_in_file - HEADER_BYTES),
        )
    (data_crc,) = struct.unpack_from("<I", buf, end)
    if masked_crc32c(buf[pos + HEADER_BYTES : end]) != data_crc:
        return FRAME_BAD, None, "bad record data (checksum)"
    return FRAME_OK, end + FOOTER_BYTES, None


def resync(buf, start, more_in_file=0):
    """The next offset >= start of `buf` where a frame verifies (or may: it runs past `buf`),
    else len(buf), or, with more of the file to come, the last bytes that could still start one."""
    pos = start
    while pos < len(buf):
        found = _candidates(buf, pos, len(buf))
        if not found:
            break
        for candidate in found:
            if frame_at(buf, candidate, more_in_file)[0] != FRAME_BAD:
                return candidate
        pos = found[-1] + 1
    return max(start, len(buf) - (HEADER_BYTES - 1)) if more_in_file else len(buf)


def iter_records(buf, damage):
    """Yields (offset, data) of every intact frame of `buf`; records the rest in `damage`."""
    pos, size = 0, len(buf)
    while pos < size:
        status, end, problem = frame_at(buf, pos)
        if status == FRAME_OK:
            damage.records += 1
            yield pos, bytes(buf[pos + HEADER_BYTES : end - FOOTER_BYTES])
            pos = end
            continue
        if pos == 0 and problem.startswith("bad record header"):
            problem = "not a readable event file (bad first record header)"
        damage.add(pos, problem)
        nxt = resync(buf, pos + 1)
        damage.skipped_bytes += nxt - pos
        pos = nxt


def read_events(path, damage=None):
    """Yields (offset, Event) of every intact record of the event file at `path`; the
    damage (bad frames, records that are not Events, an unreadable file) goes to `damage`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if damage is None:
                damage = FileDamage(path, size)
            damage.size = size
            if size == 0:
                return
            # What is on disk, read once: its size bounds every allocation (a length field
            # never does).  Not mmap: a file cut shorter while mapped kills the reader (SIGBUS).
            content = f.read(size)
        damage.size = len(content)
        for offset, data in iter_records(memoryview(content), damage):
            try:
                event = event_pb2.Event.FromString(data)
            except (pb_message.DecodeError, RecursionError, ValueError) as e:
                damage.add(
                    offset, "record is not a TensorBoard event (%s)" % (str(e) or type(e).__name__)
                )
                continue
            yield offset, event
    except OSError as e:
        if damage is None:
            damage = FileDamage(path, 0)
        damage.add(0, "unreadable: %s" % (e.strerror or e))


# -- logdirs -------------------------------------------------------------------------
def is_event_file(name):
    return "tfevents" in name and not name.endswith(".profile-empty")


def find_runs(logdir):
    """{run: [event file paths, sorted]} below `logdir`, runs named as TensorBoard names them
    (path relative to logdir, "." for logdir itself).  Symbolic links are followed, but
    every directory is entered once: a link back up (`self -> .`, `r/up -> ..`) is no loop,
    and a run reached twice is listed once, under its first (shortest, non-link) path."""
    runs = {}
    seen = set()
    pending = [str(logdir)]
    while pending:
        directory = pending.pop(0)  # breadth first: the shortest path to a directory wins
        try:
            st = os.stat(directory)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            entries = sorted(os.scandir(directory), key=lambda e: (e.is_symlink(), e.name))
        except OSError:
            continue
        files, subdirs = [], []
        for entry in entries:
            try:
                if entry.is_dir():
                    subdirs.append(entry.path)
                elif is_event_file(entry.name) and entry.is_file():
                    files.append(entry.path)
            except OSError:
                continue
        if files:
            runs[os.path.relpath(directory, logdir)] = sorted(files)
        pending.extend(subdirs)
    return runs


# A file whose only damage is an incomplete last record and that changed this recently is
# probably being written (a live run), and the warning says so.
LIVE_SECONDS = 60

# A decoded tensor is allocated from its shape alone (a proto of a few bytes can claim
# 2**40 elements); nanwatch matrices are sites x statistics, far below this.
MAX_TENSOR_ELEMENTS = 1 << 28


def _elements(tensor_proto):
    """Elements the tensor claims, or None for a negative dimension."""
    n = 1
    for dim in tensor_proto.tensor_shape.dim:
        if dim.size < 0:
            return None
        n *= dim.size
    return n


class TensorRefused(ValueError):
    """A summary tensor that is not decoded: its shape claims too much, or it cannot be."""


def tensor_value(tensor_proto):
    """The numpy value of a summary tensor; TensorRefused (in words) for a shape past
    MAX_TENSOR_ELEMENTS or a proto numpy cannot decode."""
    elements = _elements(tensor_proto)
    if elements is None or elements > MAX_TENSOR_ELEMENTS:
        raise TensorRefused(
            "tensor shape %s refused" % [d.size for d in tensor_proto.tensor_shape.dim]
        )
    try:
        return tensor_util.make_ndarray(tensor_proto)
    except Exception as e:  # hostile protos make numpy raise all sorts
        raise TensorRefused("tensor cannot be decoded (%s)" % e)


class _Series:
    """One tag of one run: its first metadata and its tensors."""

    def __init__(self, plugin_name, content, description):
        self.plugin_name = plugin_name
        self.content = content
        self.description = description
        self.data = []  # TensorDatum, in file order


class LogdirProvider(tb_provider.DataProvider):
    """TensorBoard's DataProvider over the event files of a logdir, read by `read_events`.

    Only tensor summaries of `plugin_names` are kept (the CLI's needs).  As in TensorBoard,
    a tag's first metadata says which plugin it belongs to.  Unlike TensorBoard, a tag
    whose first record was lost to damage (so no metadata ever arrived) is still kept when
    `orphan_plugin(tag)` names its plugin: its content is then empty and the reader takes
    the site list from a sibling tag.

    `damage[run]` lists one line per damaged file; `bytes_read` counts the bytes scanned
    (for a progress bar); `on_bytes(n)`, if given, is told as files are read.
    """

    def __init__(self, logdir, plugin_names, orphan_plugin=None, on_bytes=None):
        self._logdir = str(logdir)
        self._plugins = set(plugin_names)
        self._orphan_plugin = orphan_plugin
        self.damage = {}
        self.bytes_read = 0
        self._runs = {}  # run -> {tag: _Series}
        from tb_nanwatch import runfiles

        for run, paths in find_runs(self._logdir).items():
            # Protocol 3 keeps rows in the run's row files, beside its event files.
            rows = [
                p for p in runfiles.run_files(os.path.join(self._logdir, run)) if p not in paths
            ]
            for path in paths + rows:
                self._load(run, path)
                if on_bytes is not None:
                    on_bytes(self.bytes_read)

    def _load(self, run, path):
        damage = FileDamage(path, 0)
        tags = self._runs.setdefault(run, {})
        for offset, event in read_events(path, damage):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                series = tags.get(value.tag)
                if series is None:
                    if value.HasField("metadata"):
                        plugin = value.metadata.plugin_data.plugin_name
                        series = _Series(
                            plugin,
                            value.metadata.plugin_data.content,
                            value.metadata.summary_description,
                        )
                    else:
                        plugin = self._orphan_plugin(value.tag) if self._orphan_plugin else None
                        series = _Series(plugin, b"", "")
                    tags[value.tag] = series
                if series.plugin_name not in self._plugins or not value.HasField("tensor"):
                    continue
                try:
                    array = tensor_value(value.tensor)
                except TensorRefused as e:
                    damage.add(offset, "tag %s step %d: %s" % (value.tag, event.step, e))
                    continue
                series.data.append(
                    tb_provider.TensorDatum(step=event.step, wall_time=event.wall_time, numpy=array)
                )
        self.bytes_read += damage.size
        if damage:
            words = damage.words()
            if len(damage.places) == 1 and damage.places[0][1].startswith("truncated"):
                try:
                    age = time.time() - os.path.getmtime(path)
                except OSError:
                    age = None
                if age is not None and age < LIVE_SECONDS:
                    words += (
                        " (the file changed %.0f s ago: its writer may still be writing it)"
                        % max(age, 0)
                    )
            self.damage.setdefault(run, []).append("%s: %s" % (os.path.basename(path), words))
        if not tags:
            del self._runs[run]

    # -- DataProvider --------------------------------------------------------------
    def experiment_metadata(self, ctx=None, *, experiment_id):
        return tb_provider.ExperimentMetadata(data_location=self._logdir)

    def list_plugins(self, ctx=None, *, experiment_id):
        return sorted(
            {
                s.plugin_name
                for tags in self._runs.values()
                for s in tags.values()
                if s.plugin_name in self._plugins and s.data
            }
        )

    def list_runs(self, ctx=None, *, experiment_id):
        return [
            tb_provider.Run(run_id=run, run_name=run, start_time=None) for run in sorted(self._runs)
        ]

    def list_scalars(self, ctx=None, *, experiment_id, plugin_name, run_tag_filter=None):
        return {}

    def read_scalars(
        self, ctx=None, *, experiment_id, plugin_name, downsample=None, run_tag_filter=None
    ):
        return {}

    def read_last_scalars(self, ctx=None, *, experiment_id, plugin_name, run_tag_filter=None):
        return {}

    def _matching(self, plugin_name, run_tag_filter):
        runs = run_tag_filter.runs if run_tag_filter is not None else None
        tags = run_tag_filter.tags if run_tag_filter is not None else None
        for run, by_tag in sorted(self._runs.items()):
            if runs is not None and run not in runs:
                continue
            for tag, series in sorted(by_tag.items()):
                if (
                    series.plugin_name == plugin_name
                    and series.data
                    and (tags is None or tag in tags)
                ):
                    yield run, tag, series

    def list_tensors(self, ctx=None, *, experiment_id, plugin_name, run_tag_filter=None):
        out = collections.defaultdict(dict)
        for run, tag, series in self._matching(plugin_name, run_tag_filter):
            out[run][tag] = tb_provider.TensorTimeSeries(
                max_step=max(d.step for d in series.data),
                max_wall_time=max(d.wall_time for d in series.data),
                plugin_content=series.content,
                description=series.description,
                display_name="",
            )
        return dict(out)

    def read_tensors(
        self, ctx=None, *, experiment_id, plugin_name, downsample=None, run_tag_filter=None
    ):
        out = collections.defaultdict(dict)
        for run, tag, series in self._matching(plugin_name, run_tag_filter):
            data = series.data
            if downsample is not None and len(data) > downsample:
                # Not needed by the reader (it asks for everything); evenly spaced, last kept.
                picks = np.unique(np.linspace(0, len(data) - 1, max(downsample, 1)).astype(int))
                data = [data[i] for i in picks]
            out[run][tag] = list(data)
        return dict(out)
