"""Synthetic nanwatch logdirs written through the real record format (summary.RecordWriter).

For plugin and CLI tests that need known data without training a model.
"""

import numpy as np

from tb_nanwatch import stats, summary

LAYERS = ("dense", "dense_1", "dense_2")


def sites_for(layers=LAYERS):
    sites = [summary.make_site("input_layer", "input", "", "float32", (32, 8))]
    sites += [summary.make_site(l, "activation", "", "float32", (32, 16)) for l in layers]
    sites += [summary.make_site("", "loss", "", "float32", ())]
    sites += [
        summary.make_site(l, "activation_grad", "", "float32", (32, 16)) for l in reversed(layers)
    ]
    for l in reversed(layers):
        sites += [
            summary.make_site(l, "weight_grad", t, "float32", (8, 16)) for t in ("kernel", "bias")
        ]
    for l in layers:
        for t in ("kernel", "bias"):
            sites += [
                summary.make_site(l, "optimizer_state", "%s/%s" % (slot, t), "float32", (8, 16))
                for slot in ("momentum", "velocity")
            ]
            sites.append(summary.make_site(l, "weight", t, "float32", (8, 16)))
    return sites


def finite_row(n_sites, step, steps=1, scale=1.0):
    row = np.full((n_sites, len(stats.STATS)), np.nan)
    col = stats.STAT_INDEX
    row[:, col["steps"]] = steps
    row[:, col["size"]] = 128
    for name in ("nan", "posinf", "neginf", "nonfinite_steps", "zero_frac"):
        row[:, col[name]] = 0
    magnitude = scale * (1 + np.arange(n_sites)) * (1 + step / 1000.0)
    row[:, col["min"]] = -magnitude
    row[:, col["max"]] = magnitude
    row[:, col["max_abs"]] = magnitude
    row[:, col["mean"]] = 0.01 * magnitude
    row[:, col["std"]] = 0.5 * magnitude
    row[:, col["norm"]] = magnitude * 8
    row[:, col["max_norm"]] = magnitude * 8
    row[:, col["headroom"]] = np.log2(3.4e38 / magnitude)
    return row


def set_loss(row, sites, value):
    """Makes the loss site of `row` hold the scalar loss `value`."""
    col = stats.STAT_INDEX
    s = next(i for i, site in enumerate(sites) if site["kind"] == "loss")
    for name in ("min", "max", "mean", "norm", "max_norm"):
        row[s, col[name]] = value
    row[s, col["max_abs"]] = abs(value)
    row[s, col["std"]] = 0.0
    row[s, col["size"]] = 1


def write_run(
    logdir, n_rows=50, log_every=10, first=None, sites=None, flight=8, loss=None, row_file=True
):
    """A run with `n_rows` rows every `log_every` steps; `loss(step)`, if given, is the loss
    site's value at each row.  `first=(step, site_index, kind)`
    with kind in nan/posinf/neginf makes that site non-finite from `step` on, writes the
    first non-finite record, the flight recorder, and the propagation to later sites.
    `row_file=False`: every record in the one event file (the layout of a remote logdir,
    and of logs written before protocol 3)."""
    sites = sites or sites_for()
    n = len(sites)
    col = stats.STAT_INDEX
    with summary.RecordWriter(logdir, sites, log_every=log_every, row_file=row_file) as writer:
        for i in range(n_rows):
            step = (i + 1) * log_every - 1
            row = finite_row(n, step, steps=log_every)
            if loss is not None:
                set_loss(row, sites, loss(step))
            if first is not None and step >= first[0]:
                f_step, f_site, f_kind = first
                start = max(f_step, step - log_every + 1)
                bad = range(f_site, n)
                for s in bad:
                    row[s, col[f_kind]] = 3 * (step - start + 1)
                    row[s, col["nonfinite_steps"]] = step - start + 1
                    row[s, col["first_nonfinite_step"]] = (
                        start if s == f_site or start > f_step else f_step
                    )
            writer.write_row(step, row)
            if first is not None and step - log_every < first[0] <= step:
                f_step, f_site, f_kind = first
                fsteps = list(range(max(0, f_step - flight + 1), f_step + 1))
                frows = []
                for fs in fsteps:
                    fr = finite_row(n, fs, steps=1)
                    if fs == f_step:
                        for s in range(f_site, n):
                            fr[s, col[f_kind]] = 3
                            fr[s, col["nonfinite_steps"]] = 1
                            fr[s, col["first_nonfinite_step"]] = f_step
                    frows.append(fr)
                writer.write_flight(fsteps, frows)
                site = sites[f_site]
                counts = {k: (3 if k == f_kind else 0) for k in stats.NONFINITE_STATS}
                writer.write_first_nonfinite(
                    f_step,
                    dict(
                        layer=site["layer"],
                        kind=site["kind"],
                        tensor=site["tensor"],
                        site=f_site,
                        propagators=[
                            dict(
                                layer=sites[s]["layer"],
                                kind=sites[s]["kind"],
                                tensor=sites[s]["tensor"],
                                **counts,
                            )
                            for s in range(f_site + 1, n)
                        ],
                        **counts,
                    ),
                )
    return sites


# MobileNetV2's layer names as Keras builds them: 156 layers, 944 sites under Adam.
_PADDED = (1, 3, 6, 13)
_ADDED = (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)
MOBILENET_MODEL = "mobilenetv2_1.00_224"


def mobilenet_layers():
    """[(layer, trainable variables)] in forward order."""
    layers = [
        ("input_layer", ()),
        ("Conv1", ("kernel",)),
        ("bn_Conv1", ("gamma", "beta")),
        ("Conv1_relu", ()),
    ]
    for part in ("depthwise", "project"):
        layers += [
            ("expanded_conv_%s" % part, ("kernel",)),
            ("expanded_conv_%s_BN" % part, ("gamma", "beta")),
        ]
        if part == "depthwise":
            layers.append(("expanded_conv_depthwise_relu", ()))
    for b in range(1, 17):
        layers += [
            ("block_%d_expand" % b, ("kernel",)),
            ("block_%d_expand_BN" % b, ("gamma", "beta")),
            ("block_%d_expand_relu" % b, ()),
        ]
        if b in _PADDED:
            layers.append(("block_%d_pad" % b, ()))
        layers += [
            ("block_%d_depthwise" % b, ("kernel",)),
            ("block_%d_depthwise_BN" % b, ("gamma", "beta")),
            ("block_%d_depthwise_relu" % b, ()),
            ("block_%d_project" % b, ("kernel",)),
            ("block_%d_project_BN" % b, ("gamma", "beta")),
        ]
        if b in _ADDED:
            layers.append(("block_%d_add" % b, ()))
    layers += [
        ("Conv_1", ("kernel",)),
        ("Conv_1_bn", ("gamma", "beta")),
        ("out_relu", ()),
        ("global_average_pooling2d", ()),
        ("predictions", ("kernel", "bias")),
    ]
    return layers


def mobilenet_sites():
    """The 944 sites of MobileNetV2 (64x64 inputs, Adam) in execution order."""
    layers = mobilenet_layers()
    sites = [summary.make_site("input_layer", "input", "", "float32", (32, 64, 64, 3))]
    sites += [
        summary.make_site(l, "activation", "", "float32", (32, 8, 8, 32)) for l, _ in layers[1:]
    ]
    sites.append(summary.make_site(MOBILENET_MODEL, "loss", "", "float32", ()))
    sites += [
        summary.make_site(l, "activation_grad", "", "float32", (32, 8, 8, 32))
        for l, _ in reversed(layers[1:])
    ]
    variables = [(l, v) for l, vs in layers for v in vs]
    sites += [
        summary.make_site(l, "weight_grad", v, "float32", (3, 3, 32))
        for l, v in reversed(variables)
    ]
    for l, v in variables:
        sites += [
            summary.make_site(l, "optimizer_state", "%s/%s" % (slot, v), "float32", (3, 3, 32))
            for slot in ("momentum", "velocity")
        ]
        sites.append(summary.make_site(l, "weight", v, "float32", (3, 3, 32)))
    return sites
