"""Plugin name, tags and the versioned summary metadata of nanwatch records."""

import json

from tensorboard.compat.proto import summary_pb2

PLUGIN_NAME = "nanwatch"

# Bumped when the layout of a record changes; readers migrate older versions.
PROTOCOL_VERSION = 1

# Record kinds; each is one tag per site list ("group").
ROWS = "rows"                  # float64 [n_sites, n_stats], step = last step of the row
FLIGHT = "flight"              # float64 [n_sites, n_stats], one per step before the first non-finite
FIRST_NONFINITE = "first_nonfinite"  # scalar string: JSON object, step = that step
EVENTS = "events"              # scalar string: JSON list of events at that step (loss-scale skips, ...)
RECORDS = (ROWS, FLIGHT, FIRST_NONFINITE, EVENTS)

TAG_PREFIX = "nanwatch"

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


def rows_per_block(n_sites, n_stats):
    return max(1, BLOCK_BYTES // max(1, n_sites * n_stats * 8))


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
