"""Writes nanwatch records to TensorBoard event files, without TensorFlow.

The device-side writer (`tb_nanwatch.writer`) hands numpy arrays to a
`RecordWriter`; tests, benchmarks and tools can write the same records directly.

Record layout (see `metadata`): rows and flight rows are handed over as float64
matrices [n_sites, n_stats] in `stats.STAT_NAMES` order and stored compactly
(`metadata.encode_row`); the first non-finite record and events are JSON strings.
"""

import json
import os
import socket
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from tb_nanwatch import metadata, stats

SITE_FIELDS = ("layer", "kind", "tensor", "dtype", "shape")


def make_site(layer, kind, tensor="", dtype="float32", shape=()):
    """A site as stored in the metadata: where (layer, kind, tensor) and what (dtype, shape)."""
    if kind not in stats.KINDS:
        raise ValueError("unknown site kind %r; expected one of %s" % (kind, ", ".join(stats.KINDS)))
    return {"layer": str(layer), "kind": kind, "tensor": str(tensor), "dtype": str(dtype),
            "shape": [int(d) if d is not None else -1 for d in shape]}


def site_label(site):
    """`dense/weight_grad/kernel`: how a site is named in words everywhere."""
    return "/".join(p for p in (site["layer"], site["kind"], site.get("tensor", "")) if p)


class RecordWriter:
    """Appends nanwatch records of one site list to an event file in `logdir`.

    `flush()` pushes everything to the OS at once (a killed process loses nothing
    written before it); the first non-finite record is flushed as it is written.
    """

    def __init__(self, logdir, sites, group=None, flush_secs=30, log_every=100):
        self.logdir = str(logdir)
        self.sites = [dict(s) for s in sites]
        self.group = group
        self._n_stats = len(stats.STAT_NAMES)
        # Rows go to the tag of their step's block (see metadata.BLOCK_BYTES); by step, not by
        # count, so a resumed run keeps each block bounded.
        self.steps_per_block = metadata.rows_per_block(len(self.sites)) * int(log_every)
        self._tagged = set()   # tags whose metadata this file already carries
        self._writer = EventFileWriter(
            self.logdir, max_queue_size=1000, flush_secs=flush_secs,
            filename_suffix=".nanwatch")
        self._closed = False

    # -- records ---------------------------------------------------------------
    def write_row(self, step, row, wall_time=None, record=metadata.ROWS):
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (len(self.sites), self._n_stats):
            raise ValueError("row shape %s, expected %s" % (row.shape, (len(self.sites), self._n_stats)))
        block = int(step) // self.steps_per_block if record == metadata.ROWS else 0
        self._write(record, step, tensor_util.make_tensor_proto(metadata.encode_row(int(step), row)),
                    wall_time, block)

    def write_flight(self, steps, rows):
        """The flight recorder: one row per step, steps ascending."""
        for step, row in zip(steps, rows):
            self.write_row(step, row, record=metadata.FLIGHT)

    def write_first_nonfinite(self, step, record):
        """The first non-finite site of the run; flushed to disk at once."""
        payload = dict(record, step=int(step))
        self._write(metadata.FIRST_NONFINITE, step, _string_tensor(json.dumps(payload, sort_keys=True)))
        self.flush()

    def write_events(self, step, events):
        """A JSON list of events at `step`, e.g. [{"type": "loss_scale_skip", ...}]."""
        self._write(metadata.EVENTS, step, _string_tensor(json.dumps(list(events), sort_keys=True)))

    # -- plumbing --------------------------------------------------------------
    def _write(self, record, step, tensor_proto, wall_time=None, block=0):
        if self._closed:
            raise RuntimeError("RecordWriter for %s is closed" % self.logdir)
        tag = metadata.tag(record, self.group, block)
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_proto)
        if tag not in self._tagged:
            with_sites = record in (metadata.ROWS, metadata.FLIGHT)
            value.metadata.CopyFrom(metadata.create_summary_metadata(
                record,
                sites=self.sites if with_sites else None,
                stat_names=metadata.DISK_STATS if with_sites else None))
            self._tagged.add(tag)
        event = event_pb2.Event(
            wall_time=time.time() if wall_time is None else wall_time,
            step=int(step), summary=summary_pb2.Summary(value=[value]))
        self._writer.add_event(event)

    def flush(self):
        self._writer.flush()

    def close(self):
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _string_tensor(text):
    return tensor_util.make_tensor_proto(np.array(text.encode("utf-8"), dtype=object))


def default_run_name():
    """A run directory name unique per host and process (multi-worker runs never clobber)."""
    return "%s-%d" % (socket.gethostname(), os.getpid())
