"""Writes nanwatch records to TensorBoard event files, without TensorFlow.

The device-side writer (`tb_nanwatch.writer`) hands numpy arrays to a
`RecordWriter`; tests, benchmarks and tools can write the same records directly.

Record layout (see `metadata`): rows and flight rows are handed over as float64
matrices [n_sites, n_stats] in `stats.STAT_NAMES` order and stored compactly
(`metadata.encode_row`); the first non-finite record and events are JSON strings.

Where (protocol 3): the small records go to an event file in `logdir`, which TensorBoard
reads and lists; rows and flight rows go to the run's row file
(`logdir/plugins/nanwatch/<event file name>.rows`, see `runfiles`), which only tb_nanwatch
reads, a zoomed window at a time: TensorBoard's memory does not grow with the run.  A
logdir that is not a local path (`gs://...`) gets the rows in the event file (protocol 2's
layout), read through TensorBoard's data provider.
"""

import json
import logging
import os
import socket
import struct
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from tb_nanwatch import eventfile, metadata, runfiles, stats

logger = logging.getLogger(__name__)

SITE_FIELDS = ("layer", "kind", "tensor", "dtype", "shape")


def make_site(layer, kind, tensor="", dtype="float32", shape=()):
    """A site as stored in the metadata: where (layer, kind, tensor) and what (dtype, shape)."""
    if kind not in stats.KINDS:
        raise ValueError(
            "unknown site kind %r; expected one of %s" % (kind, ", ".join(stats.KINDS))
        )
    return {
        "layer": str(layer),
        "kind": kind,
        "tensor": str(tensor),
        "dtype": str(dtype),
        "shape": [int(d) if d is not None else -1 for d in shape],
    }


def site_label(site):
    """`dense/weight_grad/kernel`: how a site is named in words everywhere."""
    return "/".join(p for p in (site["layer"], site["kind"], site.get("tensor", "")) if p)


class RecordWriter:
    """Appends nanwatch records of one site list to an event file in `logdir`.

    `flush()` pushes everything to the OS at once (a killed process loses nothing
    written before it); the first non-finite record is flushed as it is written.

    `row_file=False` writes rows into the event file, as for a logdir that is not a local
    path (protocol 2's layout, read through TensorBoard's data provider).

    Writing never stops training: when the logdir cannot be written (disk full, quota, a
    read-only or vanished filesystem), one error is logged, later records are dropped
    (`failed` says why, `dropped` counts them), and what was written before stays as it
    was.  A first non-finite record that cannot be written is logged in words instead.
    """

    def __init__(self, logdir, sites, group=None, flush_secs=30, log_every=100, row_file=True):
        self.logdir = str(logdir)
        self.sites = [dict(s) for s in sites]
        self.group = group
        self._n_stats = len(stats.STAT_NAMES)
        # Rows go to the tag of their step's block (see metadata.BLOCK_BYTES); by step, not by
        # count, so a resumed run keeps each block bounded.
        self.steps_per_block = metadata.rows_per_block(len(self.sites)) * int(log_every)
        self._tagged = set()  # tags whose metadata this file already carries
        self._closed = False
        self.failed = None  # why writing stopped, in words
        self.dropped = 0  # records not written since
        self._guard = None
        self._last_step = None
        self._rows = None  # the row file (protocol 3), when the logdir is a local path
        try:
            self._writer = EventFileWriter(
                self.logdir, max_queue_size=1000, flush_secs=flush_secs, filename_suffix=".nanwatch"
            )
            self._guard = _guard_records(self._writer)
        except Exception as e:  # an OSError, or TensorFlow's errors when its gfile is in use
            self._writer = None
            self._fail(e, "cannot create an event file in")
        else:
            if row_file:
                self._open_rows()

    def _open_rows(self):
        if "://" in self.logdir:  # TensorBoard's data provider reads those rows
            return
        # Named after the event file, but without `tfevents`: TensorBoard's loaders take any
        # directory holding a file so named for a run, and would read it.
        event_name = os.path.basename(getattr(self._writer, "_file_name", "") or "")
        stamp = event_name.replace("events.out.tfevents.", "").replace(".nanwatch", "")
        name = "rows." + (stamp or "%010d.%s.%s" % (time.time(), socket.gethostname(), os.getpid()))
        relative = os.path.join(runfiles.ROWS_DIR, name + runfiles.ROWS_SUFFIX)
        try:
            os.makedirs(os.path.join(self.logdir, runfiles.ROWS_DIR), exist_ok=True)
            self._rows = open(os.path.join(self.logdir, relative), "ab")
        except OSError as e:
            self._fail(e, "cannot create a row file in")
            return
        run = {"rows_file": relative.replace(os.sep, "/"), "sites": len(self.sites)}
        self._write(metadata.RUN, 0, _string_tensor(json.dumps(run, sort_keys=True)))

    # -- records ---------------------------------------------------------------
    def write_row(self, step, row, wall_time=None, record=metadata.ROWS):
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (len(self.sites), self._n_stats):
            raise ValueError(
                "row shape %s, expected %s" % (row.shape, (len(self.sites), self._n_stats))
            )
        block = int(step) // self.steps_per_block if record == metadata.ROWS else 0
        self._write(
            record,
            step,
            tensor_util.make_tensor_proto(metadata.encode_row(int(step), row)),
            wall_time,
            block,
        )

    def write_flight(self, steps, rows):
        """The flight recorder: one row per step, steps ascending."""
        for step, row in zip(steps, rows):
            self.write_row(step, row, record=metadata.FLIGHT)

    def write_initial(self, row):
        """The state training starts from, before step 0's update (`metadata.INITIAL`): a row
        in the table's columns, NaN for the sites it does not measure."""
        self.write_row(0, row, record=metadata.INITIAL)

    def write_first_nonfinite(self, step, record):
        """The first non-finite site of the run; flushed to disk at once."""
        payload = dict(record, step=int(step))
        text = json.dumps(payload, sort_keys=True)
        self._write(metadata.FIRST_NONFINITE, step, _string_tensor(text))
        self.flush()
        if self.failed:
            # The evidence survives in the training log when the logdir cannot keep it.
            logger.error(
                "tb_nanwatch: the first non-finite record could not be written to %s; "
                "here it is: %s",
                self.logdir,
                text,
            )

    def write_events(self, step, events):
        """A JSON list of events at `step`, e.g. [{"type": "loss_scale_skip", ...}]."""
        self._write(metadata.EVENTS, step, _string_tensor(json.dumps(list(events), sort_keys=True)))

    def write_scalars(self, step, values):
        """{name: value} as standard TensorBoard scalars (`metadata.SCALARS`), shown in the
        Scalars tab: e.g. {"learning_rate": 1e-3, "loss": 0.25}."""
        summary_values = []
        for name, value in sorted(values.items()):
            tag = metadata.scalar_tag(name, self.group)
            value = summary_pb2.Summary.Value(
                tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(value))
            )
            if tag not in self._tagged:
                value.metadata.CopyFrom(
                    scalar_metadata.create_summary_metadata(
                        display_name=name, description=metadata.SCALARS[name.split("/")[0]]
                    )
                )
                self._tagged.add(tag)
            summary_values.append(value)
        if not summary_values:
            return
        if self._closed:
            raise RuntimeError("RecordWriter for %s is closed" % self.logdir)
        if self.failed:
            self.dropped += 1
            return
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=summary_values)
        )
        self._io(self._writer.add_event, event, at_step=step)

    # -- plumbing --------------------------------------------------------------
    def _write(self, record, step, tensor_proto, wall_time=None, block=0):
        if self._closed:
            raise RuntimeError("RecordWriter for %s is closed" % self.logdir)
        if self.failed:
            self.dropped += 1
            return
        self._last_step = int(step)
        tag = metadata.tag(record, self.group, block)
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_proto)
        if tag not in self._tagged:
            with_sites = record in (metadata.ROWS, metadata.FLIGHT, metadata.INITIAL)
            value.metadata.CopyFrom(
                metadata.create_summary_metadata(
                    record,
                    sites=self.sites if with_sites else None,
                    stat_names=metadata.DISK_STATS if with_sites else None,
                )
            )
            self._tagged.add(tag)
        event = event_pb2.Event(
            wall_time=time.time() if wall_time is None else wall_time,
            step=int(step),
            summary=summary_pb2.Summary(value=[value]),
        )
        if self._rows is not None and record in (metadata.ROWS, metadata.FLIGHT):
            self._io(self._rows.write, _frame(event.SerializeToString()), at_step=step)
        else:
            self._io(self._writer.add_event, event, at_step=step)

    def flush(self):
        if not self.failed:
            if self._rows is not None:
                self._io(self._rows.flush)
            self._io(self._writer.flush)

    def close(self):
        if not self._closed:
            if self._rows is not None:
                self._io(self._rows.close, quiet_after_failure=True)
            if self._writer is not None:
                self._io(self._writer.close, quiet_after_failure=True)
            self._closed = True

    def _io(self, call, *args, at_step=None, quiet_after_failure=False):
        """Runs one call into TensorBoard's writer; a write error (raised here, or kept by
        the guard from its background thread) stops writing instead of training."""
        if self.failed and quiet_after_failure:
            try:
                call(*args)
            except Exception:
                pass
            return
        try:
            call(*args)
        except Exception as e:
            self._fail(e, "cannot write to", at_step)
            return
        if self._guard is not None and self._guard.error is not None:
            self._fail(self._guard.error, "cannot write to", at_step)

    def _fail(self, error, doing, at_step=None):
        if self.failed:
            return
        words = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
        self.failed = "%s (%s)" % (words, type(error).__name__)
        step = at_step if at_step is not None else self._last_step
        self.dropped += 1 if at_step is not None else 0
        logger.error(
            "tb_nanwatch: %s %s: %s. Training goes on without nanwatch records%s; the records "
            "already on disk are intact and readable (tb-nanwatch report skips a half-written "
            "last record).",
            doing,
            self.logdir,
            self.failed,
            "" if step is None else " from about step %d on" % int(step),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _GuardedRecords:
    """Sits between TensorBoard's writer thread and the event file: a failing write is
    kept in `error` instead of raised.  Raised there, it would kill the thread with a
    traceback on stderr and surface at some later call; kept, RecordWriter logs it once."""

    def __init__(self, records):
        self._records = records
        self.error = None

    def _call(self, name, *args):
        if self.error is None:
            try:
                getattr(self._records, name)(*args)
            except Exception as e:
                self.error = e

    def write(self, data):
        self._call("write", data)

    def flush(self):
        self._call("flush")

    def close(self):
        try:
            self._records.close()
        except Exception as e:
            self.error = self.error or e

    @property
    def closed(self):
        return self._records.closed


def _guard_records(writer):
    """Puts a `_GuardedRecords` into an EventFileWriter (TensorBoard 2.x internals: its
    `_AsyncWriter` and that writer's thread each hold the record writer).  None, and the
    plain raise-and-catch path, where the internals differ."""
    async_writer = getattr(writer, "_async_writer", None)
    worker = getattr(async_writer, "_worker", None)
    records = getattr(async_writer, "_writer", None)
    if records is None or getattr(worker, "_record_writer", None) is not records:
        return None
    guard = _GuardedRecords(records)
    async_writer._writer = guard
    worker._record_writer = guard
    if worker.exception is not None:  # the file_version record already failed
        guard.error = worker.exception
    return guard


def _frame(data):
    """One TFRecord frame (see `eventfile`), checksummed in C (google-crc32c)."""
    header = struct.pack("<Q", len(data))
    return b"".join(
        (
            header,
            struct.pack("<I", eventfile.masked_crc32c(header)),
            data,
            struct.pack("<I", eventfile.masked_crc32c(data)),
        )
    )


def _string_tensor(text):
    return tensor_util.make_tensor_proto(np.array(text.encode("utf-8"), dtype=object))


def default_run_name():
    """A run directory name unique per host and process (multi-worker runs never clobber)."""
    return "%s-%d" % (socket.gethostname(), os.getpid())
