"""The diagnosis (tb_nanwatch/causes.py + diagnosis.py) on synthetic RunData.

Each test builds the evidence one cause leaves in the logs (sites with dtype and shape,
rows, the first non-finite record, events) on top of a healthy run, and checks that the
diagnosis names that cause first and quotes the figures.  The healthy run itself must get
no cause.  tests/test_diagnosis_demo.py does the same on real training runs.
"""

import json
import math
import os

import numpy as np

from tb_nanwatch import causes, diagnosis, reader, report, stats, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COL = stats.STAT_INDEX


def mlp_sites(layers=("dense", "dense_1", "dense_2"), dtype="float32", width=16, features=8):
    """Sites of a Dense stack trained with Adam, in execution order, with real shapes."""
    sites = [summary.make_site("input_layer", "input", "", dtype, (32, features))]
    sites += [
        summary.make_site(l, "activation", "", dtype, (32, width if i < len(layers) - 1 else 1))
        for i, l in enumerate(layers)
    ]
    sites.append(summary.make_site("", "loss", "", "float32", ()))
    fan_in = {l: (features if i == 0 else width) for i, l in enumerate(layers)}
    fan_out = {l: (width if i < len(layers) - 1 else 1) for i, l in enumerate(layers)}
    for l in reversed(layers):
        sites.append(summary.make_site(l, "activation_grad", "", dtype, (32, fan_out[l])))
        sites.append(summary.make_site(l, "weight_grad", "kernel", dtype, (fan_in[l], fan_out[l])))
        sites.append(summary.make_site(l, "weight_grad", "bias", dtype, (fan_out[l],)))
    for l in layers:
        for t in ("kernel", "bias"):
            shape = (fan_in[l], fan_out[l]) if t == "kernel" else (fan_out[l],)
            for slot in ("momentum", "velocity"):
                sites.append(
                    summary.make_site(l, "optimizer_state", "%s/%s" % (slot, t), dtype, shape)
                )
            sites.append(summary.make_site(l, "weight", t, dtype, shape))
    return sites


class Run:
    """A healthy run (one row per step, every statistic measured) to put evidence into."""

    def __init__(self, sites=None, steps=40, seed=0):
        self.sites = sites or mlp_sites()
        self.rng = np.random.default_rng(seed)
        n = len(self.sites)
        self.steps = np.arange(steps)
        self.rows = np.full((steps, n, len(stats.STATS)), np.nan)
        self.first = None
        self.events = []
        for s, site in enumerate(self.sites):
            size = int(np.prod(site["shape"])) if site["shape"] else 1
            scale = {"input": 1.0, "activation": 0.8, "loss": 0.7, "weight": 0.3}.get(
                site["kind"], 0.01
            )
            if site["kind"] == "weight" and site["tensor"] == "kernel":
                scale = math.sqrt(1.0 / site["shape"][0])  # Glorot-like RMS
            rms = scale * (1 + 0.05 * self.rng.standard_normal(steps))
            if site["kind"] == "loss":
                rms = 0.7 * np.exp(-self.steps / 30.0)  # a loss that decreases
            self.set(
                s,
                size=size,
                norm=rms * math.sqrt(size),
                max_abs=3 * rms,
                std=rms,
                mean=0.1 * rms,
                min=-3 * rms,
                max=3 * rms,
                zero_frac=0.0,
                steps=1,
                nan=0,
                posinf=0,
                neginf=0,
                nonfinite_steps=0,
            )
            limit = diagnosis.dtype_limits(site["dtype"])[0]
            self.set(s, headroom=np.log2(limit / (3 * rms)))
            if site["dtype"] in ("float16", "bfloat16"):
                self.set(s, underflow_frac=0.0)

    def index(self, layer, kind, tensor=""):
        return next(
            i
            for i, s in enumerate(self.sites)
            if (s["layer"], s["kind"], s["tensor"]) == (layer, kind, tensor)
        )

    def set(self, site, at=slice(None), **values):
        for name, value in values.items():
            self.rows[at, site, COL[name]] = value

    def blow_up(self, step, site, kind="posinf", count=1, **record):
        """The first non-finite value: `site` at `step`, spreading to every later site; rows end there."""
        self.steps, self.rows = self.steps[: step + 3], self.rows[: step + 3]
        for s in range(site, len(self.sites)):
            for t in range(step, len(self.steps)):
                self.rows[t, s, COL[kind]] = count
                self.rows[t, s, COL["nonfinite_steps"]] = 1
                self.rows[t, s, COL["first_nonfinite_step"]] = step
        sampled = [st.name for st in stats.STATS if not st.every_step]
        self.rows[step, site:, [COL[n] for n in sampled]] = np.nan  # nothing finite left to sample
        self.rows[step + 1 :, :, [COL[n] for n in sampled]] = np.nan
        s = self.sites[site]
        self.first = dict(
            step=step,
            site=site,
            layer=s["layer"],
            kind=s["kind"],
            tensor=s["tensor"],
            nan=0,
            posinf=0,
            neginf=0,
            **record,
        )
        self.first[kind] = count
        return self

    def data(self):
        return reader.RunData(
            "run",
            None,
            self.sites,
            self.steps,
            self.rows,
            np.zeros(0, np.int64),
            np.zeros((0, len(self.sites), len(stats.STATS))),
            self.first,
            self.events,
        )

    def causes(self):
        return [d["cause"] for d in diagnosis.diagnose(self.data())]


def first_finding(run):
    found = diagnosis.diagnose(run.data())
    assert found, "no cause named"
    return found[0]


# -- the table -------------------------------------------------------------------
def test_every_cause_has_exactly_one_rule():
    assert set(diagnosis.RULES) == set(causes.CAUSE_IDS)
    assert len(causes.CAUSE_IDS) == len(set(causes.CAUSE_IDS))


def test_the_contract_ids_are_in_the_table():
    assert set(causes.CAUSE_IDS) >= {
        "nonfinite_input",
        "unscaled_inputs",
        "unscaled_targets",
        "large_initial_weights",
        "learning_rate_too_high",
        "exploding_gradients",
        "optimizer_state_overflow",
        "unstable_loss",
        "domain_error",
        "reduced_precision_overflow",
        "reduced_precision_underflow",
        "loss_scale_collapse",
        "vanishing_gradients",
    }


def test_docs_page_is_generated_from_the_table():
    with open(os.path.join(ROOT, "docs", "causes.md")) as f:
        page = f.read()
    assert page == causes.as_markdown(causes.summary_of(page)), (
        "docs/causes.md is stale: python -m tb_nanwatch.causes --write docs/causes.md"
    )
    assert "top-1" in causes.summary_of(page), "docs/causes.md holds no measured figures"
    for c in causes.CAUSES:
        assert "## %s" % c.id in page and c.remedy in page and c.rule in page


# Each threshold the rules use, and a cause whose words quote it.
QUOTED_THRESHOLDS = {
    "INPUT_SCALE": "unscaled_inputs",
    "HUGE_LOSS": "unscaled_targets",
    "OUTPUT_VS_LOSS": "unscaled_targets",
    "INIT_GAIN": "large_initial_weights",
    "INIT_RATIO": "large_initial_weights",
    "RECURRENT_INIT_RATIO": "large_initial_weights",
    "DOMAIN_HEADROOM": "domain_error",
    "DOMAIN_INPUT": "domain_error",
    "OVERFLOWED_OUTPUT": "unstable_loss",
    "GROWTH_TOTAL": "learning_rate_too_high",
    "GROWTH_STEADY": "learning_rate_too_high",
    "GRADIENT_DEPTH_RATIO": "exploding_gradients",
    "GRADIENT_GROWTH": "exploding_gradients",
    "UPDATE_JUMP": "exploding_gradients",
    "RECURRENT_STATE": "recurrent_explosion",
    "VANISHED_ROWS": "vanishing_gradients",
}


def test_the_rules_words_quote_the_thresholds_the_code_uses():
    """One place: diagnosis reads each threshold from causes, whose words quote it."""
    for name, cause in QUOTED_THRESHOLDS.items():
        value = getattr(causes, name)
        assert getattr(diagnosis, name) is value, name
        assert causes._x(value) in causes.CAUSES_BY_ID[cause].rule, (name, cause)
    assert "%g%%" % (100 * causes.UNDERFLOW_FRACTION) in (
        causes.CAUSES_BY_ID["reduced_precision_underflow"].rule
    )
    assert (
        "%g%%" % (100 * causes.VANISHED_FRACTION) in causes.CAUSES_BY_ID["vanishing_gradients"].rule
    )


def test_every_remedy_names_the_keras_code_to_change():
    for c in causes.CAUSES:
        assert "`" in c.remedy, c.id


# -- healthy ---------------------------------------------------------------------
def test_healthy_run_gets_no_cause():
    assert diagnosis.diagnose(Run().data()) == []


def test_healthy_run_with_a_loss_scale_skip_event_gets_no_cause():
    run = Run()
    run.events = [{"type": "loss_scale_skip", "step": 3, "loss_scale": 16384.0}]
    assert run.causes() == []


# -- one test per cause -----------------------------------------------------------
def test_nonfinite_input():
    run = Run().blow_up(12, 0, kind="nan", count=3)
    f = first_finding(run)
    assert f["cause"] == "nonfinite_input"
    assert "3 NaN at step 12" in f["evidence"]
    assert f["sites"] == [{"layer": "input_layer", "kind": "input", "tensor": ""}] and f[
        "steps"
    ] == [12]
    assert f["remedy"] == causes.CAUSES_BY_ID["nonfinite_input"].remedy


def test_unscaled_inputs_ranked_by_how_far():
    run = Run()
    run.set(0, max_abs=9.6e9, std=5.5e9, norm=5.5e9 * 16)
    run.blow_up(3, run.index("dense", "optimizer_state", "velocity/kernel"))
    f = first_finding(run)
    assert f["cause"] == "unscaled_inputs" and "9.6e+09" in f["evidence"]
    mild = Run()
    mild.set(0, max_abs=100.0, std=29.0)
    mild.blow_up(0, mild.index("", "loss"), kind="nan")
    found = mild.causes()
    assert (
        found[0] == "unstable_loss" and "unscaled_inputs" in found
    )  # a contributing condition only
    scaled = Run().blow_up(0, mild.index("", "loss"), kind="nan")
    assert "unscaled_inputs" not in scaled.causes()


def test_unscaled_targets_huge_loss_small_output():
    run = Run()
    loss = run.index("", "loss")
    run.set(loss, max_abs=2.5e10)
    run.set(run.index("dense_2", "activation_grad"), max_abs=6e3)
    run.blow_up(6, run.index("dense_1", "activation"))
    f = first_finding(run)
    assert f["cause"] == "unscaled_targets"
    assert (
        "2.5e+10" in f["evidence"] and "1.58e+05" in f["evidence"]
    )  # sqrt(loss): the targets' size
    assert {"layer": "", "kind": "loss", "tensor": ""} in f["sites"]


def test_a_sum_over_many_terms_is_not_a_target_problem():
    """A loss summed over a million terms is huge with no targets at all: its gradient is small."""
    run = Run()
    run.set(run.index("", "loss"), max_abs=1.5e6)
    run.blow_up(6, run.index("dense_1", "activation"), kind="neginf")
    assert "unscaled_targets" not in run.causes()


def test_large_initial_weights_from_the_first_steps_gain():
    run = Run()
    run.set(run.index("dense_1", "weight", "kernel"), norm=1e29)  # after a wild first update
    run.set(run.index("dense", "activation"), at=0, norm=0.8 * math.sqrt(32 * 16))
    run.set(run.index("dense_1", "activation"), at=0, norm=262 * 0.8 * math.sqrt(32 * 16))
    run.blow_up(1, run.index("dense_2", "activation"))
    f = first_finding(run)
    assert f["cause"] == "large_initial_weights"
    assert (
        "dense_1's output at step 0" in f["evidence"]
        and "262x the RMS of its input" in f["evidence"]
    )
    assert f["sites"] == [{"layer": "dense_1", "kind": "weight", "tensor": "kernel"}]


def test_large_initial_weights_from_the_kernel_alone():
    """No activation sites (a lean Watch): the kernel's RMS against the He scale."""
    sites = [s for s in mlp_sites() if s["kind"] != "activation"]
    run = Run(sites)
    run.set(
        run.index("dense_1", "weight", "kernel"), norm=15.3 * 16
    )  # U(10, 20): RMS 15.3 over 256
    run.blow_up(1, run.index("", "loss"))
    f = first_finding(run)
    assert (
        f["cause"] == "large_initial_weights"
        and "RMS 15.3" in f["evidence"]
        and "He scale" in f["evidence"]
    )


def test_a_wild_first_update_is_not_a_large_initialisation():
    """Weights are logged after the update: a huge first step (Adam with an underflowed velocity)
    makes them large at step 0 although the forward pass, before the update, had a normal gain."""
    run = Run()
    run.set(run.index("dense_1", "weight", "kernel"), norm=15.3 * 16)
    run.blow_up(1, run.index("dense_2", "activation"))
    assert "large_initial_weights" not in run.causes()


def test_reduced_precision_underflow_before_the_blow_up():
    run = Run(mlp_sites(dtype="float16"))
    run.set(
        run.index("dense", "optimizer_state", "velocity/kernel"),
        at=0,
        underflow_frac=1.0,
        zero_frac=0.2,
    )
    run.blow_up(1, run.index("dense_2", "activation"))
    found = diagnosis.diagnose(run.data())
    assert [f["cause"] for f in found][:2] == [
        "reduced_precision_underflow",
        "reduced_precision_overflow",
    ]
    assert "velocity/kernel" in found[0]["evidence"] and found[0]["steps"] == [0]


def test_reduced_precision_underflow_in_a_finite_run_is_a_warning():
    run = Run(mlp_sites(dtype="float16"))
    run.set(run.index("dense", "weight_grad", "kernel"), underflow_frac=1.0, zero_frac=1.0)
    found = run.causes()
    assert found[0] == "reduced_precision_underflow" and "vanishing_gradients" in found


def test_reduced_precision_overflow():
    run = Run(mlp_sites(dtype="float16"))
    run.blow_up(0, run.index("dense", "activation"), count=512)
    f = first_finding(run)
    assert f["cause"] == "reduced_precision_overflow"
    assert (
        "float16" in f["evidence"] and "6.55e+04" in f["evidence"] and "512 +Inf" in f["evidence"]
    )


def test_unstable_loss():
    run = Run()
    out = run.index("dense_2", "activation")
    run.set(out, min=0.0, max=0.675, zero_frac=0.78)
    run.blow_up(0, run.index("", "loss"), kind="neginf")
    f = first_finding(run)
    assert f["cause"] == "unstable_loss"
    assert (
        "-Inf at step 0" in f["evidence"]
        and "[0, 0.675]" in f["evidence"]
        and "78%" in f["evidence"]
    )


def test_a_loss_that_grew_into_inf_is_not_an_unstable_formula():
    run = Run()
    run.set(run.index("", "loss"), at=slice(0, 10), max_abs=np.logspace(30, 38, 10))
    run.blow_up(10, run.index("", "loss"))
    assert "unstable_loss" not in run.causes()


def test_domain_error_in_a_layer():
    run = Run()
    run.set(run.index("dense", "activation"), min=0.0, max=1.0)
    run.blow_up(11, run.index("dense_1", "activation"), kind="neginf")
    f = first_finding(run)
    assert f["cause"] == "domain_error"
    assert (
        "dense_1, activation went 1 -Inf at step 11" in f["evidence"] and "[0, 1]" in f["evidence"]
    )


def test_domain_error_in_a_gradient_names_the_backward_pass():
    run = Run()
    run.blow_up(
        8, run.index("dense_2", "activation_grad"), kind="nan", count=16, backward_of=["dense_2"]
    )
    f = first_finding(run)
    assert f["cause"] == "domain_error" and "(dense_2)" in f["evidence"]


def test_an_overflow_from_a_huge_input_is_not_a_domain_error():
    run = Run()
    run.set(run.index("dense", "activation"), at=8, max_abs=5.6e20)
    run.blow_up(8, run.index("dense_1", "activation"))
    assert "domain_error" not in run.causes()


def test_learning_rate_too_high():
    run = Run()
    kernel = run.index("dense", "weight", "kernel")
    run.set(kernel, at=slice(0, 30), norm=1.3 * 1.25 ** np.arange(30))
    run.blow_up(30, run.index("dense_1", "activation"))
    f = first_finding(run)
    assert f["cause"] == "learning_rate_too_high"
    assert "x1.25 a step" in f["evidence"] and "steadiness 1.00" in f["evidence"]
    assert f["steps"] == [0, 29]


def test_exploding_gradients_layer_over_layer():
    run = Run()
    for i, layer in enumerate(("dense_2", "dense_1", "dense")):  # backward order
        run.set(run.index(layer, "activation_grad"), norm=0.01 * 1e2**i)
    run.blow_up(5, run.index("dense", "weight_grad", "kernel"))
    f = first_finding(run)
    assert f["cause"] == "exploding_gradients" and "1e+04x" in f["evidence"]


def test_exploding_gradients_step_over_step_while_the_weights_do_not_grow():
    run = Run()
    run.set(
        run.index("dense_1", "weight_grad", "kernel"),
        at=slice(0, 20),
        norm=0.01 * 1.5 ** np.arange(20),
    )
    run.blow_up(20, run.index("dense_1", "weight_grad", "kernel"))
    f = first_finding(run)
    assert f["cause"] == "exploding_gradients" and "while the weights did not" in f["evidence"]


def test_optimizer_state_overflow():
    run = Run()
    run.set(run.index("dense", "weight_grad", "kernel"), at=3, max_abs=1.85e19)
    run.blow_up(3, run.index("dense", "optimizer_state", "velocity/kernel"))
    f = first_finding(run)
    assert f["cause"] == "optimizer_state_overflow"
    assert "1.85e+19" in f["evidence"] and "g^2 = 3.42e+38" in f["evidence"]


def test_loss_scale_collapse_names_the_gradient_closest_to_overflow():
    run = Run(mlp_sites(dtype="float16"))
    run.events = [{"type": "loss_scale_collapse", "step": 15, "loss_scale": 0.5}]
    grad = run.index("dense_1", "activation_grad")
    run.set(grad, at=11, headroom=0.8)
    run.set(
        run.index("dense", "activation_grad"), at=21, headroom=0.1
    )  # after the collapse: not its cause
    f = first_finding(run)
    assert (
        f["cause"] == "loss_scale_collapse"
        and "0.5 at step 15" in f["evidence"]
        and f["steps"] == [11, 15]
    )
    assert (
        "dense_1, activation gradient, 0.8 doublings below float16's largest value at step 11"
        in f["evidence"]
    )
    assert f["sites"] == [{"layer": "dense_1", "kind": "activation_grad", "tensor": ""}]


def test_vanishing_gradients_in_a_finite_run():
    run = Run()
    run.set(run.index("dense", "weight_grad", "kernel"), at=slice(5, None), zero_frac=1.0)
    f = first_finding(run)
    assert f["cause"] == "vanishing_gradients"
    assert "35 of 40 logged rows, from step 5" in f["evidence"]
    few = Run()
    few.set(few.index("dense", "weight_grad", "kernel"), at=slice(5, 7), zero_frac=1.0)
    assert few.causes() == []


def test_blow_up_causes_are_not_named_for_a_finite_run():
    run = Run()
    run.set(0, max_abs=1e10)  # unscaled, but nothing went wrong
    run.set(run.index("dense", "weight", "kernel"), norm=1.3 * 1.25 ** np.arange(40))
    assert run.causes() == []


# -- output -----------------------------------------------------------------------
def test_report_json_and_why_section():
    run = Run()
    run.set(0, max_abs=9.6e9, std=5.5e9)
    run.set(run.index("dense", "weight_grad", "kernel"), at=3, max_abs=1.85e19)
    run.blow_up(3, run.index("dense", "optimizer_state", "velocity/kernel"))
    rep = report.RunReport(run.data())
    out = json.loads(json.dumps(rep.as_json()))
    assert [d["cause"] for d in out["diagnosis"]] == ["unscaled_inputs", "optimizer_state_overflow"]
    for d in out["diagnosis"]:
        assert set(d) >= {"cause", "evidence", "remedy", "sites", "steps"}
    assert out["early_warning"] is None
    text = "\n".join(rep.text())
    assert "  why (most likely first):" in text
    assert "    1. unscaled_inputs: Inputs far outside the unit range" in text
    assert "    2. optimizer_state_overflow:" in text
    assert text.index("why (most likely first)") > text.index("producer:")


def test_finite_run_with_a_warning_says_why_to_worry():
    run = Run()
    run.set(run.index("dense", "weight_grad", "kernel"), at=slice(5, None), zero_frac=1.0)
    text = "\n".join(report.RunReport(run.data()).text())
    assert (
        "finite: no NaN or Inf" in text
        and "why to worry" in text
        and "1. vanishing_gradients" in text
    )
    assert "why" not in "\n".join(report.RunReport(Run().data()).text())


# -- facts over inference: watched targets, overflow, weight gradients, new causes -----


def with_target(sites):
    """The sites with the batch's targets watched, as the writer puts them: before the loss."""
    loss = next(i for i, s in enumerate(sites) if s["kind"] == "loss")
    target = summary.make_site("", "target", "", "float32", (32, 1))
    return sites[:loss] + [target] + sites[loss:]


def test_small_watched_targets_cannot_make_a_huge_loss():
    """A loss multiplied by 1e18 is huge from the start while the targets are small: the watched
    targets' largest |y| is a fact that rules unscaled_targets out (it stays named when they are
    huge)."""

    def run_with_targets(largest_target):
        run = Run(with_target(mlp_sites()))
        run.set(run.index("", "loss"), max_abs=5.5e18)
        run.set(run.index("dense_2", "activation_grad"), max_abs=6e3)
        run.set(run.index("", "target"), max_abs=largest_target)
        run.blow_up(6, run.index("dense_1", "activation"))
        return run

    assert "unscaled_targets" not in run_with_targets(3.2).causes()
    found = diagnosis.diagnose(run_with_targets(4e9).data())
    assert found[0]["cause"] == "unscaled_targets" and "largest |y| 4e+09" in found[0]["evidence"]


def test_a_loss_overflowed_by_a_huge_output_is_not_the_loss_formula():
    run = Run()
    run.set(run.index("dense_2", "activation"), at=slice(0, 3), max_abs=1.1e37)
    run.blow_up(2, run.index("", "loss"))
    assert "unstable_loss" not in run.causes()
    small = Run()
    small.set(small.index("dense_2", "activation"), max_abs=2.7)
    small.blow_up(2, small.index("", "loss"))
    assert small.causes()[0] == "unstable_loss"


def test_domain_error_in_a_weight_gradient():
    """tf.norm(x - centre) at 0: the gradient w.r.t. the layer's own weight is 0/0."""
    run = Run()
    run.blow_up(0, run.index("dense", "weight_grad", "kernel"), kind="nan", count=8)
    f = first_finding(run)
    assert f["cause"] == "domain_error"
    assert "undefined gradient w.r.t. this weight" in f["evidence"]


def test_one_update_that_multiplies_the_weights_is_an_exploding_gradient():
    """A summed loss through a deep ReLU stack: step 0's update makes the kernels 30x larger and
    the next forward pass overflows; there are not enough steps for a growth trend."""
    run = Run()
    kernel = run.index("dense_1", "weight", "kernel")
    run.set(kernel, at=0, norm=4.0)
    run.set(kernel, at=1, norm=120.0)
    run.set(run.index("dense_1", "weight_grad", "kernel"), at=1, norm=6.7e3)
    run.set(run.index("dense_2", "activation"), at=slice(0, 4), max_abs=1e37)
    run.blow_up(2, run.index("", "loss"))
    f = first_finding(run)
    assert f["cause"] == "exploding_gradients"
    assert "one update multiplied the norm of dense_1, weight kernel by 30" in f["evidence"]
    assert "6.7e+03" in f["evidence"]


def test_optimizer_zero_division():
    """Adam with epsilon=0: a weight goes NaN at its update, its gradient and slots finite."""
    run = Run()
    run.set(run.index("dense", "weight_grad", "kernel"), at=4, zero_frac=0.375)
    run.blow_up(4, run.index("dense", "weight", "kernel"), kind="nan", count=48)
    f = first_finding(run)
    assert f["cause"] == "optimizer_zero_division"
    assert "38% of the gradient was exactly 0" in f["evidence"]
    # A weight that a non-finite slot made NaN is not a division of 0 by 0.
    slot = Run()
    slot.blow_up(4, slot.index("dense", "weight", "kernel"), kind="nan", count=48)
    slot.set(slot.index("dense", "optimizer_state", "velocity/kernel"), at=4, max_abs=np.inf)
    assert "optimizer_zero_division" not in slot.causes()


def rnn_sites(time_steps=40, units=16):
    """input [batch, time, features] -> SimpleRNN -> Dense, trained with SGD."""
    cell = "simple_rnn/simple_rnn_cell"
    return [
        summary.make_site("input_layer", "input", "", "float32", (32, time_steps, 4)),
        summary.make_site("simple_rnn", "activation", "", "float32", (32, units)),
        summary.make_site("dense", "activation", "", "float32", (32, 1)),
        summary.make_site("", "loss", "", "float32", ()),
        summary.make_site("dense", "activation_grad", "", "float32", (32, 1)),
        summary.make_site("dense", "weight_grad", "kernel", "float32", (units, 1)),
        summary.make_site("simple_rnn", "activation_grad", "", "float32", (32, units)),
        summary.make_site(cell, "weight_grad", "kernel", "float32", (4, units)),
        summary.make_site(cell, "weight_grad", "recurrent_kernel", "float32", (units, units)),
        summary.make_site(cell, "weight", "kernel", "float32", (4, units)),
        summary.make_site(cell, "weight", "recurrent_kernel", "float32", (units, units)),
        summary.make_site("dense", "weight", "kernel", "float32", (units, 1)),
    ]


def test_recurrent_explosion_names_the_layer_and_its_gain():
    run = Run(rnn_sites())
    state = run.index("simple_rnn", "activation")
    run.set(run.index("input_layer", "input"), max_abs=3.0)
    run.set(state, at=slice(5, 9), max_abs=np.array([2e7, 1e12, 1e20, 1e30]))
    run.set(run.index("dense", "activation"), at=slice(5, 9), max_abs=1e31)
    recurrent = run.index("simple_rnn/simple_rnn_cell", "weight", "recurrent_kernel")
    run.set(recurrent, at=slice(0, 8), norm=np.linspace(4.0, 24.0, 8))  # RMS x 4 = gain
    run.blow_up(8, run.index("", "loss"))
    f = first_finding(run)
    assert f["cause"] == "recurrent_explosion"
    assert "reached |h| 2e+07 at step 5" in f["evidence"] and "over 40 time steps" in f["evidence"]
    assert "was 6 at step 7" in f["evidence"]  # norm 24 over 256 elements: RMS 1.5, x sqrt(16)
    assert {"layer": "simple_rnn", "kind": "activation", "tensor": ""} in f["sites"]


def test_a_recurrent_kernel_started_too_large_is_the_initialisation():
    """RMS 1.0 over 32 units: 4x sqrt(2 / units); below the 5x of other kernels, but it
    multiplies the state at each of 40 steps."""
    run = Run(rnn_sites(units=32))
    recurrent = run.index("simple_rnn/simple_rnn_cell", "weight", "recurrent_kernel")
    run.set(recurrent, norm=1.0 * 32)
    run.set(run.index("simple_rnn", "activation"), at=slice(0, 3), max_abs=6e30)
    run.set(run.index("dense", "activation"), at=slice(0, 3), max_abs=6e30)
    run.blow_up(0, run.index("", "loss"))
    found = run.causes()
    assert found[:2] == ["large_initial_weights", "recurrent_explosion"]


def test_gradients_that_explode_by_depth_at_the_start_outrank_the_weights_growth():
    """A deep net whose gradients multiply 1e4x backward at step 0, before any weight grew, and
    whose weights then grow: the depth is the root, the growth its consequence."""
    run = Run()
    for i, layer in enumerate(("dense_2", "dense_1", "dense")):  # backward order
        run.set(run.index(layer, "activation_grad"), at=0, norm=0.01 * 1e2**i)
    run.set(
        run.index("dense", "weight", "kernel"), at=slice(0, 30), norm=1.3 * 1.25 ** np.arange(30)
    )
    run.blow_up(30, run.index("dense_1", "activation"))
    found = run.causes()
    assert found[:2] == ["exploding_gradients", "learning_rate_too_high"]
    assert "before the weights could grow" in first_finding(run)["evidence"]


def test_growth_is_read_from_where_it_starts_after_a_warm_up():
    """A warm-up schedule that overshoots: the kernel is flat for 20 steps, then grows 1.6x a
    step until the blow-up; the flat part does not hide the growth."""
    run = Run()
    norms = np.r_[np.full(20, 2.4), 2.4 * 1.6 ** np.arange(1, 11)]
    run.set(run.index("dense", "weight", "kernel"), at=slice(0, 30), norm=norms)
    run.blow_up(30, run.index("dense_1", "activation"))
    f = first_finding(run)
    assert f["cause"] == "learning_rate_too_high" and "x1.6 a step" in f["evidence"]


def test_a_nan_slot_with_a_small_gradient_divided_zero_by_zero():
    """Adadelta with epsilon=0: its delta accumulator goes NaN (0/0) while the gradient is
    0.07 at most; nothing overflowed, so it is not optimizer_state_overflow."""
    run = Run()
    run.set(run.index("dense", "weight_grad", "kernel"), at=0, max_abs=0.0677)
    run.blow_up(0, run.index("dense", "optimizer_state", "velocity/kernel"), kind="nan", count=8)
    f = first_finding(run)
    assert f["cause"] == "optimizer_zero_division" and "largest |g| 0.0677" in f["evidence"]
    assert "optimizer_state_overflow" not in run.causes()
    overflow = Run()
    overflow.set(overflow.index("dense", "weight_grad", "kernel"), at=3, max_abs=1.85e19)
    overflow.blow_up(3, overflow.index("dense", "optimizer_state", "velocity/kernel"), kind="nan")
    assert overflow.causes()[0] == "optimizer_state_overflow"
