"""Damaged and hand-made event files for the damage and fuzz tests.

`frames` is an independent, strict TFRecord walk (TensorBoard's own stub checksum, no
resynchronisation): the oracle for "is this file damaged" and "is this record intact".
"""

import io
import json
import os
import struct

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from tb_nanwatch import cli, metadata, stats


def frames(data):
    """([(offset, end, frame bytes)], damaged) of a whole file's bytes, strictly."""
    out, offset = [], 0
    while offset < len(data):
        if len(data) - offset < 12:
            return out, True
        length, length_crc = struct.unpack_from("<QI", data, offset)
        if (
            masked_crc32c(data[offset : offset + 8]) != length_crc
            or length > len(data) - offset - 16
        ):
            return out, True
        end = offset + 12 + length + 4
        if masked_crc32c(data[offset + 12 : end - 4]) != struct.unpack_from("<I", data, end - 4)[0]:
            return out, True
        out.append((offset, end, bytes(data[offset:end])))
        offset = end
    return out, False


def frame(payload):
    header = struct.pack("<Q", len(payload))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def event_of(frame_bytes):
    return event_pb2.Event.FromString(frame_bytes[12:-4])


def only_event_file(run_dir):
    (name,) = [n for n in os.listdir(run_dir) if "tfevents" in n]
    return os.path.join(run_dir, name)


def only_row_file(run_dir):
    """The run's row file (protocol 3: rows and flight rows, beside the event file)."""
    rows_dir = os.path.join(run_dir, "plugins", "nanwatch")
    (name,) = [n for n in os.listdir(rows_dir) if n.endswith(".rows")]
    return os.path.join(rows_dir, name)


def value(tag, tensor, content=None):
    """A Summary.Value of `tag`; with `content` (bytes or a JSON-able object) as nanwatch metadata."""
    v = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if content is not None:
        v.metadata.plugin_data.plugin_name = metadata.PLUGIN_NAME
        v.metadata.plugin_data.content = (
            content if isinstance(content, bytes) else json.dumps(content).encode()
        )
        v.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    return v


def string_tensor(text):
    return tensor_util.make_tensor_proto(
        np.array(text.encode("utf-8") if isinstance(text, str) else text, dtype=object)
    )


def rows_content(site_list, stat_names=stats.STAT_NAMES, **changes):
    content = {
        "version": metadata.PROTOCOL_VERSION,
        "record": "rows",
        "sites": list(site_list),
        "stats": list(stat_names),
    }
    content.update(changes)
    return content


def write_events(run_dir, step_values):
    """An event file of [(step, Summary.Value)], written as TensorBoard writes one."""
    writer = EventFileWriter(str(run_dir))
    for step, v in step_values:
        writer.add_event(
            event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(value=[v]))
        )
    writer.close()


class _Stream(io.StringIO):
    def isatty(self):
        return False


def run_cli(*args):
    """`tb-nanwatch report ARGS` in this process: (exit status, stdout, stderr).  With
    TB_NANWATCH_DEBUG set, an internal error raises instead of printing one line."""
    import sys

    out, err = _Stream(), _Stream()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = cli.main(["report"] + [str(a) for a in args])
    finally:
        sys.stdout, sys.stderr = saved
    return rc, out.getvalue(), err.getvalue()
