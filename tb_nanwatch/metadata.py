"""Plugin name, tags and the versioned summary metadata of nanwatch records."""

import json

import numpy as np
from tensorboard.compat.proto import summary_pb2

from tb_nanwatch import stats

PLUGIN_NAME = "nanwatch"

# Bumped when the layout of a record changes; readers migrate older versions.
# 1: rows float64 [n_sites, 17], every column of the table.
# 2: rows float32 [1 + n_sites, 16] (64 bytes per site): a header line holding the steps
#    the row covers (what is the same for every site), then a line per site without the
#    `steps` column, the first non-finite step stored as an offset back from the row's step
#    (exact in float32 for rows shorter than 2**24 steps, whatever the run's length).
# 3: rows and flight rows as in 2, but in the run's row file (`plugins/nanwatch/*.rows`, see
#    `runfiles`), which TensorBoard's loaders never read: what TensorBoard holds stays small
#    whatever the run's length.  The event file holds a `run` record naming that file.  Site
#    lists may hold the kinds `target` and `sample_weight` and a weight's `role`; an `initial`
#    record.  Readers of version 2 would refuse those kinds site by site (and with them the
#    rows), so the version says it first: "upgrade tb_nanwatch".  Versions 1 and 2 read as before.
PROTOCOL_VERSION = 3

# Record kinds; each is one tag per site list ("group").
ROWS = "rows"  # float32 [1 + n_sites, len(DISK_STATS)], step = last step of the row
FLIGHT = "flight"  # same, one per step before the first non-finite
FIRST_NONFINITE = "first_nonfinite"  # scalar string: JSON object, step = that step
EVENTS = "events"  # scalar string: JSON list of events at that step (loss-scale skips, ...)
RUN = "run"  # scalar string: JSON {"rows_file": path relative to the run, "sites": n}
# The state training starts from, before step 0's update: one row like ROWS (at step 0) in which
# only weights and optimizer slots are measured, and `steps` is NaN (it covers no step).  Rows
# log weights after each step's update; this is what "initial" means.  Readers that predate it
# skip the tag (an unknown record name is not a nanwatch tag to them).
INITIAL = "initial"
RECORDS = (ROWS, FLIGHT, FIRST_NONFINITE, EVENTS, RUN, INITIAL)

TAG_PREFIX = "nanwatch"

# Per-row scalars written as standard TensorBoard scalar summaries (plugin "scalars"), so that
# TensorBoard's own Scalars tab shows them beside the NanWatch tab: `nanwatch/learning_rate` (one
# per optimizer, `nanwatch/learning_rate/<name>`, when a step applies several), `nanwatch/loss`,
# `nanwatch/gradient_norm`, `nanwatch/loss_scale`.  Not nanwatch records: parse_tag skips them.
SCALARS = {
    "learning_rate": "the learning rate the optimizer applied at this step (a schedule's value)",
    "loss": "the training loss at this step (not an epoch mean)",
    "gradient_norm": "global L2 norm of the finite elements of the weight gradients at this step, "
    "before clipping, without the loss scale",
    "loss_scale": "the mixed-precision loss scale after this step",
}

# Rows are spread over tags by step block ("nanwatch/rows", "nanwatch/rows.0001", ...) so that
# one tag's answer from the data provider stays far below gRPC's 256 MiB message limit, which
# RustBoard's client enforces (a run of 1,000 sites reaches it at about 2,000 rows).
BLOCK_BYTES = 32 * 2**20


def tag(record, group=None, block=0):
    """`nanwatch/rows`, `nanwatch/<group>/rows` for a second site list in the same run, and
    `nanwatch/rows.0007` for block 7 of the rows."""
    if record not in RECORDS:
        raise ValueError("unknown nanwatch record %r" % (record,))
    name = "/".join([TAG_PREFIX] + ([group] if group else []) + [record])
    return name + (".%04d" % block if block else "")


def scalar_tag(name, group=None):
    """`nanwatch/learning_rate`, `nanwatch/<group>/loss`, `nanwatch/learning_rate/d_optimizer`."""
    if name.split("/")[0] not in SCALARS:
        raise ValueError("unknown nanwatch scalar %r" % (name,))
    return "/".join([TAG_PREFIX] + ([group] if group else []) + [name])


def parse_tag(tag_name):
    """(group, record) of a nanwatch tag, or None for anything else."""
    parsed = parse_block_tag(tag_name)
    return parsed and parsed[:2]


def parse_block_tag(tag_name):
    """(group, record, block) of a nanwatch tag, or None for anything else."""
    parts = tag_name.split("/")
    record, _, block = parts[-1].partition(".")
    if len(parts) < 2 or parts[0] != TAG_PREFIX or record not in RECORDS:
        return None
    if block and not (record == ROWS and block.isdigit()):
        return None
    group = "/".join(parts[1:-1]) or None
    return group, record, int(block or 0)


# The columns of a row on disk (protocol 2), named in each tag's metadata.
FIRST_OFFSET = "first_nonfinite_offset"
DISK_STATS = tuple(
    FIRST_OFFSET if name == "first_nonfinite_step" else name
    for name in stats.STAT_NAMES
    if name != "steps"
)
DISK_DTYPE = np.float32


def rows_per_block(n_sites, n_stats=len(DISK_STATS), itemsize=np.dtype(DISK_DTYPE).itemsize):
    return max(1, BLOCK_BYTES // max(1, (n_sites + 1) * n_stats * itemsize))


def encode_row(step, row):
    """A row in the table's columns (float64 [n_sites, n_stats]) as stored on disk:
    float32 [1 + n_sites, len(DISK_STATS)], the header line first."""
    row = np.asarray(row, dtype=np.float64)
    col = stats.STAT_INDEX
    out = np.zeros((row.shape[0] + 1, len(DISK_STATS)), dtype=DISK_DTYPE)
    covered = row[:, col["steps"]]
    if not len(row):
        out[0, 0] = 1
    else:  # NaN only for the initial record, which covers no step
        out[0, 0] = np.nan if np.isnan(covered).all() else np.nanmax(covered)
    # A float64 statistic past float32's range (the norm of a float32 tensor near overflow)
    # saturates at float32's largest value rather than reading as an infinity.
    largest = np.finfo(DISK_DTYPE).max
    for j, name in enumerate(DISK_STATS):
        if name == FIRST_OFFSET:
            out[1:, j] = step - row[:, col["first_nonfinite_step"]]
        else:
            value = row[:, col[name]]
            out[1:, j] = np.where(np.isinf(value), value, np.clip(value, -largest, largest))
    return out


def encode_rows(steps, rows):
    """`encode_row` of many rows at once: float64 [n, n_sites, n_stats] (table order) ->
    float32 [n, 1 + n_sites, len(DISK_STATS)]."""
    steps = np.asarray(steps, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    col = stats.STAT_INDEX
    out = np.zeros((rows.shape[0], rows.shape[1] + 1, len(DISK_STATS)), dtype=DISK_DTYPE)
    if not len(rows):
        return out
    with np.errstate(invalid="ignore"):
        out[:, 0, 0] = np.fmax.reduce(rows[:, :, col["steps"]], axis=1) if rows.shape[1] else 1
    largest = np.finfo(DISK_DTYPE).max
    for j, name in enumerate(DISK_STATS):
        if name == FIRST_OFFSET:
            out[:, 1:, j] = steps[:, None] - rows[:, :, col["first_nonfinite_step"]]
        else:
            value = rows[:, :, col[name]]
            out[:, 1:, j] = np.where(np.isinf(value), value, np.clip(value, -largest, largest))
    return out


def has_header(stat_names):
    """Whether rows of this metadata carry the header line (protocol 2 on)."""
    return "steps" not in stat_names


def decode_rows(matrices, stat_names, steps):
    """Rows as stored ([n_rows, (1 +) n_sites, len(stat_names)], any protocol version) ->
    float64 [n_rows, n_sites, n_stats] in the current table's columns (unknown ones NaN)."""
    matrices = np.asarray(matrices, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    if tuple(stat_names) == stats.STAT_NAMES:
        return matrices
    header = None
    if has_header(stat_names):
        header, matrices = matrices[:, 0], matrices[:, 1:]
    out = np.full(matrices.shape[:-1] + (len(stats.STATS),), np.nan)
    for j, name in enumerate(stat_names):
        if name == FIRST_OFFSET:
            out[..., stats.STAT_INDEX["first_nonfinite_step"]] = steps[:, None] - matrices[..., j]
        elif name in stats.STAT_INDEX:
            out[..., stats.STAT_INDEX[name]] = matrices[..., j]
    if header is not None:
        out[..., stats.STAT_INDEX["steps"]] = header[:, :1]
    return out


def create_summary_metadata(record, sites=None, stat_names=None, extra=None):
    """SummaryMetadata for one record tag.  The site list and stat names travel in the
    content so that a reader with a newer statistics table still maps columns by name."""
    content = {"version": PROTOCOL_VERSION, "record": record}
    if sites is not None:
        content["sites"] = list(sites)
    if stat_names is not None:
        content["stats"] = list(stat_names)
    if extra:
        content.update(extra)
    return summary_pb2.SummaryMetadata(
        summary_description="tb_nanwatch %s record" % record,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME,
            content=json.dumps(content, sort_keys=True).encode("utf-8"),
        ),
        # Without DATA_CLASS_TENSOR both loaders hide third-party tensors.
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


class MetadataError(ValueError):
    """The plugin content of a tag cannot be understood."""


def parse_plugin_metadata(content):
    """The dict written by `create_summary_metadata`, checked and migrated."""
    if not isinstance(content, (bytes, bytearray)):
        raise TypeError("content must be bytes, got %r" % type(content).__name__)
    try:
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MetadataError("nanwatch metadata is not JSON: %s" % e)
    if not isinstance(parsed, dict) or "version" not in parsed or "record" not in parsed:
        raise MetadataError("nanwatch metadata lacks version/record: %r" % (parsed,))
    if parsed["version"] > PROTOCOL_VERSION:
        raise MetadataError(
            "nanwatch metadata version %s is newer than this reader (%s): upgrade tb_nanwatch"
            % (parsed["version"], PROTOCOL_VERSION)
        )
    return parsed
