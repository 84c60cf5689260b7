"""The one table of causes: why a run went NaN/Inf, how the logs show it, what to change.

`diagnosis.diagnose` evaluates one rule per cause (`diagnosis.RULES`, keyed by the
cause ID) on the logged evidence only, so the same diagnosis comes out of the CLI
(without TensorFlow), the tab and `report --json`.  docs/causes.md is generated from
this table (tests/test_diagnosis.py checks it is current).

The IDs are a contract (`report --json`'s `"diagnosis": [{"cause": ID, ...}]`).
`blowup` causes explain a first non-finite value and are only named for a run that
has one; the others are warnings and are named for finite runs too.
"""

import collections
import os
import sys

Cause = collections.namedtuple("Cause", ["id", "title", "rule", "remedy", "blowup"])

# The thresholds of the rules: `diagnosis` reads them from here and the rules' words below
# quote them, so docs/causes.md states what the code does.
UNDERFLOW_FRACTION = 0.9  # nearly all of a half-precision tensor below the smallest normal
HEADROOM_DOUBLINGS = 1.0  # max |x| within a factor 2 of the dtype's largest finite value
INPUT_SCALE = 50.0  # standardised data stays within about +-5
HUGE_LOSS = 1e6
OUTPUT_VS_LOSS = 0.1  # |output| below a tenth of sqrt(loss): the targets make the loss
INIT_RATIO = 5.0  # a weight's RMS over the scale of its role
RECURRENT_INIT_RATIO = 2.0  # ... for a recurrent kernel, whose excess compounds per time step
INIT_GAIN = 8.0  # a layer's output RMS over its input's, before the first update
EMBEDDING_SCALE = 1.0  # the RMS of an embedding table, at most, as training starts
NORM_SCALE = 1.0  # a normalisation layer's scale (gamma) as training starts
DOMAIN_HEADROOM = 8.0  # +Inf with more doublings left than this at the step before: not an overflow
DOMAIN_INPUT = 1e6  # ... and from an input below this (exp, division), not a huge matmul
OVERFLOWED_OUTPUT = (
    1e6  # a model output this large makes +Inf of any loss: overflow, not the formula
)
GROWTH_TOTAL = 10.0  # weights: at least 10x overall ...
GROWTH_STEADY = 0.7  # ... steadily (R^2 of log norm against step at least 0.7) ...
GROWTH_RATE = 1.05  # ... at 5% or more per step
GRADIENT_DEPTH_RATIO = 1e3  # first layer's activation gradient norm over the last layer's
GRADIENT_GROWTH = 100.0
UPDATE_JUMP = 10.0  # one update multiplies a weight's norm by this much: the gradient, not the rate
RECURRENT_STATE = 1e6  # a recurrent layer's output over its input's largest |x|: the state exploded
VANISHED_ROWS = 3
VANISHED_FRACTION = 0.5


def _x(value):
    """A threshold in words: 50, 1e+06 -> 1e6, 0.1."""
    text = "%g" % value
    return text.replace("e+0", "e").replace("e+", "e")


def _pct(fraction):
    return "%g%%" % (100 * fraction)


CAUSES = (
    Cause(
        "nonfinite_input",
        "The data itself holds NaN or Inf",
        "The producer (the first non-finite site of the step, in execution order) is the model's input: "
        "the batch was non-finite before any layer ran.",
        "Find and clean the bad rows before training: `np.isfinite(x).all(axis=1)` marks them; drop or "
        "impute them (e.g. `x = np.nan_to_num(x, nan=np.nanmean(x, axis=0))`), or check the pipeline with "
        "`dataset.map(lambda x, y: (tf.debugging.assert_all_finite(x, 'bad input'), y))`.",
        True,
    ),
    Cause(
        "nonfinite_target",
        "Your targets (labels) or sample weights hold NaN or Inf",
        "The producer is a target or sample-weight site: the labels (or the per-sample weights, "
        "`class_weight` included) of the batch were non-finite before the loss compared the model's "
        "output with them. The model and the loss function were fine; the loss only carried the value on.",
        "Check the label pipeline: `np.isfinite(y).all(axis=-1)` marks the bad rows of an array; in a "
        "`tf.data` pipeline, fail at the bad batch with `dataset.map(lambda x, y: (x, "
        "tf.debugging.assert_all_finite(y, 'bad label')))`, or drop such rows before batching with "
        "`dataset.filter(lambda x, y: tf.reduce_all(tf.math.is_finite(y)))`. For sample weights, look "
        "for a 0/0 where they are computed (a class that never occurs, a normaliser of 0).",
        True,
    ),
    Cause(
        "unscaled_inputs",
        "Inputs far outside the unit range",
        "An input site's largest |x| before the first non-finite step is above %s (standardised data stays "
        "within about +-5). Ranked by how far: 1e2 is a contributing condition, 1e6 and up the root cause."
        % _x(INPUT_SCALE),
        "Standardise the inputs: `norm = keras.layers.Normalization(); norm.adapt(x_train)` as the model's "
        "first layer, or `x = (x - x.mean(0)) / x.std(0)` with the training set's mean and std.",
        True,
    ),
    Cause(
        "unscaled_targets",
        "Targets so large that the loss is huge from the start",
        "The loss at the first logged step is above %s (or the loss itself is the producer, +Inf, at the "
        "first step) while the model's output is small: |output| below %s x sqrt(loss), so the "
        "targets, not the predictions, make the loss huge. Where the targets are watched (the `target` "
        "sites) their largest |y| is a fact: targets below %s x sqrt(loss) cannot make that loss (a loss "
        "multiplied by a constant, or a formula that diverges, can), and the cause is not named."
        % (_x(HUGE_LOSS), _x(OUTPUT_VS_LOSS), _x(OUTPUT_VS_LOSS)),
        "Scale the targets, and undo it on the predictions: `y_mean, y_std = y.mean(), y.std(); "
        "model.fit(x, (y - y_mean) / y_std)`, then `model.predict(x) * y_std + y_mean`; or log-transform "
        "positive targets (`np.log1p(y)`).",
        True,
    ),
    Cause(
        "large_initial_weights",
        "Initial weights far above the Glorot/He scale",
        "A layer with a kernel whose output at the first logged step, computed before the first update, "
        "has more than %sx the RMS of its input (He/Glorot weights keep it near 1). Without that evidence: "
        "a weight's RMS as training started more than %sx the scale of its role (a weight's role is what "
        "it is to its layer, recorded by the writer): a kernel or a custom matrix, the He scale "
        "sqrt(2 / fan_in) (fan_in: the product of all but its last dimension); an embedding "
        "table, %s; a normalisation scale (gamma), %s; a recurrent kernel, more than %sx sqrt(2 / units), "
        "since it multiplies the state once per time step and its excess compounds (counted once per "
        "time step of the layer's input in the ranking). The RMS is read from the `initial` record written "
        "before the first update (ranked higher: a fact). Logs without that record have the weights only "
        "after step 0's update: there the RMS at the first step counts unless the layer's gain says the "
        "first update, not the initialisation, made it large."
        % (
            _x(INIT_GAIN),
            _x(INIT_RATIO),
            _x(EMBEDDING_SCALE),
            _x(NORM_SCALE),
            _x(RECURRENT_INIT_RATIO),
        ),
        "Use the default initialiser, or one that scales with the fan-in: "
        '`keras.layers.Dense(n, kernel_initializer="he_normal")` for ReLU layers, "glorot_uniform" '
        "(Keras' default) otherwise; "
        '`keras.layers.Embedding(n, dim, embeddings_initializer="uniform")` (Keras\' default, +-0.05); '
        '`recurrent_initializer="orthogonal"` for recurrent layers (Keras\' default); '
        '`gamma_initializer="ones"` for normalisation layers.',
        True,
    ),
    Cause(
        "reduced_precision_underflow",
        "Half precision underflows to zero",
        "A float16/bfloat16 optimizer slot or weight gradient has %s or more of its elements below the "
        "dtype's smallest normal value (zeros included) before the first non-finite step (or anywhere in "
        "a finite run): e.g. Adam's velocity g^2 flushed to 0 makes m / (sqrt(v) + eps) explode."
        % _pct(UNDERFLOW_FRACTION),
        "Keep variables and optimizer slots in float32: `keras.mixed_precision.set_global_policy("
        '"mixed_float16")` instead of `set_dtype_policy("float16")`; Keras then also scales the loss '
        "so that small gradients survive.",
        False,
    ),
    Cause(
        "reduced_precision_overflow",
        "A float16/bfloat16 value passes its dtype's largest value",
        "The producer is a float16/bfloat16 site that went +-Inf (float16's largest finite value is 65504); "
        "or a float16/bfloat16 layer's output went NaN and the layer computes an op that overflows first "
        "(Exp, Pow, Square, Softplus ... in the run's op inventory, `nanwatch_ops.json`): Inf / Inf and "
        "Inf - Inf make the NaN, as in a hand-written softmax exp(x) / sum(exp(x)); or the replay of the "
        "failing step saw an op's output overflow in half precision.",
        "Compute in float16 but keep the variables in float32 (`keras.mixed_precision.set_global_policy("
        '"mixed_float16")`), keep the last layer in float32 (`Dense(..., dtype="float32")`), and scale '
        "inputs and initial weights so activations stay far below 65504.",
        True,
    ),
    Cause(
        "unstable_loss",
        "The loss itself is not defined for the predictions",
        "The producer is the loss (with NaN or -Inf, or +Inf without a loss above %s before it) while "
        "every site before it, the model's output included, was finite and, for +Inf, below %s in "
        "magnitude (a larger output overflows any loss: that is growth, not the formula): e.g. log(0) "
        "of a saturated sigmoid. (A loss that is finite while its gradient is not, e.g. sqrt of a "
        "distance that is 0, is `domain_error`: its remedy is the op's.)"
        % (_x(HUGE_LOSS), _x(OVERFLOWED_OUTPUT)),
        "Use Keras' own loss, which is computed stably from the logits "
        '(`loss="binary_crossentropy"`, or `keras.losses.BinaryCrossentropy(from_logits=True)` on a '
        "linear output), or keep a hand-written loss away from its singularities: "
        "`tf.math.log(tf.clip_by_value(p, 1e-7, 1 - 1e-7))`, `tf.math.log(d + 1e-3)`.",
        True,
    ),
    Cause(
        "domain_error",
        "An op inside a layer (or its gradient) is outside its domain",
        "The producer is a layer's output, the gradient w.r.t. a layer's output, or the gradient w.r.t. a "
        "layer's weight, that went NaN, -Inf or +Inf while everything before it in the step was finite, "
        "far from overflow: its headroom at the step before was more than %s doublings and (for an "
        "output) its input's largest |x| below %s. Typical: log or division by 0, sqrt or pow of a "
        "negative number, the gradient of sqrt or tf.norm at 0 (w.r.t. a layer's input or its own "
        "weights, e.g. a distance to a learned centre). NaN and -Inf rank above a lone +Inf."
        % (_x(DOMAIN_HEADROOM), _x(DOMAIN_INPUT)),
        "Keep the op inside its domain where the layer computes it: `tf.math.log(x + eps)`, "
        "`tf.math.divide_no_nan(a, b)`, `tf.sqrt(tf.maximum(x, 0.0) + 1e-12)` instead of `tf.norm` for "
        "distances that can be 0, `tf.math.abs(x) ** p` for a fractional power.",
        True,
    ),
    Cause(
        "learning_rate_too_high",
        "The learning rate is too high: the weights grow geometrically",
        "A weight that multiplies (a kernel, recurrent kernel, embedding table, normalisation scale or "
        "custom matrix, by its role) grows its L2 norm steadily step over step before the first "
        "non-finite step, from its last lowest point (after a warm-up, or a schedule that grows): at "
        "least %sx overall, at %s or more per step, steadily: log norm against step "
        "is a line (R^2 at least %s: an unstable SGD oscillates while its amplitude grows) or the norm "
        "grows in at least %s of the steps (a divergence that accelerates)."
        % (_x(GROWTH_TOTAL), _pct(GROWTH_RATE - 1), _x(GROWTH_STEADY), _pct(GROWTH_STEADY)),
        "Lower the learning rate (`keras.optimizers.SGD(learning_rate=lr / 10)`), or make it adapt: "
        "`keras.optimizers.Adam(1e-3)`, a warm-up schedule, or `clipnorm=1.0` to bound each update.",
        True,
    ),
    Cause(
        "exploding_gradients",
        "Gradients grow layer over layer backward, or step over step",
        "With 3 or more layers, the norm of the gradient w.r.t. the first layer's output is more than "
        "%sx that w.r.t. the last layer's (gradients multiply backward through the layers): at the first "
        "logged step, before the weights could grow, a root cause (ranked above the weights' growth, "
        "below `large_initial_weights` when that fires); at the last finite step, a symptom of weights "
        "that grew (ranked lower). Or a weight gradient's norm grows steadily %sx or more over the steps "
        "before the first "
        "non-finite step (ranked lower when the weights grew with it), or a single update multiplied a "
        "weight's norm by %s or more (from the `initial` record or the row before): a gradient far "
        "larger than the weights, where a learning rate that is merely too high makes them grow step "
        "after step." % (_x(GRADIENT_DEPTH_RATIO), _x(GRADIENT_GROWTH), _x(UPDATE_JUMP)),
        "Clip the gradients (`keras.optimizers.Adam(clipnorm=1.0)`, or `global_clipnorm=1.0`), and make "
        "depth trainable: He/Glorot initialisation, `keras.layers.BatchNormalization()` or "
        "`LayerNormalization()` between layers, residual connections, LSTM/GRU instead of SimpleRNN.",
        True,
    ),
    Cause(
        "recurrent_explosion",
        "The state of a recurrent layer explodes through time",
        "A recurrent layer's output (its state) overflows, or reaches more than %s x its input's largest "
        "|x|, before the first non-finite value: the recurrent kernel multiplies the state once per time "
        "step, and with a gain (its RMS x sqrt(units), 1 for Keras' orthogonal default) above 1 the state "
        "grows like gain^T over T time steps (unbounded activations: ReLU, linear). Ranked first when the "
        "recurrent kernel started at a sane scale (`large_initial_weights` otherwise); the evidence "
        "quotes the gain as training started and at the last finite step." % _x(RECURRENT_STATE),
        'Bound the state: `activation="tanh"` (Keras\' default) instead of ReLU or linear in '
        "`SimpleRNN`, or `keras.layers.LSTM`/`GRU`, whose gates keep it bounded; keep "
        '`recurrent_initializer="orthogonal"`; clip the gradients (`keras.optimizers.Adam(clipnorm=1.0)`) '
        "so that training does not push the gain above 1; shorter sequences.",
        True,
    ),
    Cause(
        "optimizer_state_overflow",
        "An optimizer slot passes the dtype's largest value",
        "The producer is an optimizer slot (e.g. Adam's velocity, the running mean of g^2) that went "
        "+Inf or NaN while the weight gradient it is built from was finite: g^2 overflows when "
        "|g| > sqrt(largest value) (1.8e19 in float32). A slot that went NaN, no Inf, while g^2 was "
        "below the largest value did not overflow: that is `optimizer_zero_division`.",
        "Bound the gradients before they reach the slots: `keras.optimizers.Adam(clipnorm=1.0)`; and "
        "remove what makes them huge (unscaled inputs or targets, a loss summed instead of averaged).",
        True,
    ),
    Cause(
        "optimizer_zero_division",
        "The optimizer's update divides 0 by 0",
        "The producer is a weight that went NaN at its update while its gradient and the optimizer "
        "slots it is updated from were finite: an adaptive optimizer (Adam, RMSprop, Adagrad, Nadam, "
        "Adamax ...) with `epsilon=0` computes m / sqrt(v) = 0 / 0 on the elements that never had a "
        "gradient (an embedding row no batch used, a dead ReLU unit, a feature that is always 0). Or "
        "the producer is an optimizer slot that went NaN, no Inf, while its gradient was finite "
        "with g^2 below the dtype's largest value: nothing overflowed, so the slot's update divided "
        "0 by 0 (Adadelta's sqrt(delta + epsilon) / sqrt(accumulator + epsilon) with both 0). The "
        "evidence quotes the share of the gradient that was exactly 0 at that step.",
        "Keep the optimizer's epsilon above 0: `keras.optimizers.Adam(epsilon=1e-7)` (Keras' default), "
        "also for `RMSprop`, `Adagrad`, `Adadelta`, `Nadam` and `Adamax`.",
        True,
    ),
    Cause(
        "loss_scale_collapse",
        "The mixed-precision loss scale collapsed",
        "A `loss_scale_collapse` event: the LossScaleOptimizer lowered the scale below 1 because the "
        "scaled gradients kept overflowing; updates are skipped and training has probably stalled. The "
        "evidence names the float16/bfloat16 gradient with the least headroom.",
        "Find the site that overflows in float16 (the heatmap's float16 gradients at the skipped steps), "
        'keep the loss and the last layer in float32 (`Dense(..., dtype="float32")`), scale the inputs '
        "and the targets (`y = (y - y.mean()) / y.std()`), or clip: `keras.optimizers.Adam(clipnorm=1.0)` "
        "under `mixed_float16`.",
        False,
    ),
    Cause(
        "vanishing_gradients",
        "Gradients or activations stuck at exactly zero",
        "The gradient of a weight that multiplies (a kernel, recurrent kernel, embedding table, "
        "normalisation scale or custom matrix) is exactly 0 in every element, or a hidden layer's output "
        "is all zeros (dead ReLU), in at least %s of the logged rows and at least %d of them: that part "
        "of the model no longer trains." % (_pct(VANISHED_FRACTION), VANISHED_ROWS),
        'Keep the gradient alive: He initialisation (`kernel_initializer="he_normal"`), '
        '`activation="leaky_relu"` or `"gelu"` instead of ReLU, a lower learning rate, '
        "`BatchNormalization()`; under half precision use `mixed_float16`, not `float16`.",
        False,
    ),
)

CAUSE_IDS = tuple(c.id for c in CAUSES)
CAUSES_BY_ID = {c.id: c for c in CAUSES}


def as_markdown(summary=""):
    """docs/causes.md: every cause with its evidence rule and remedy, and the measured block
    `summary` (run_eval.py's figures)."""
    lines = [
        "# The causes tb_nanwatch names",
        "",
        "<!-- generated from tb_nanwatch/causes.py by `python -m tb_nanwatch.causes --write docs/causes.md`",
        "     (the measured block at the end is bench/eval_causes/run_eval.py's);",
        "     tests/test_diagnosis.py fails when this page and the table disagree -->",
        "",
        "`tb-nanwatch report` (text and `--json`) and the NanWatch tab's banner name the causes below,",
        "most likely first, each with the evidence quoted from the logs. Every rule reads the logged",
        "evidence only (sites with their dtype and shape, rows, flight-recorder rows, the first non-finite",
        "record, events), so it works without TensorFlow on the logs of any run. *Blow-up* causes are",
        "named only for a run that went non-finite; *warnings* also for a finite run.",
        "",
        "| ID | cause | named for |",
        "|---|---|---|",
    ]
    for c in CAUSES:
        lines.append(
            "| [`%s`](#%s) | %s | %s |"
            % (c.id, c.id, c.title, "a blow-up" if c.blowup else "any run (warning)")
        )
    for c in CAUSES:
        lines += [
            "",
            "## %s" % c.id,
            "",
            "**%s.**" % c.title,
            "",
            "*Evidence.* %s" % c.rule,
            "",
            "*Remedy.* %s" % c.remedy,
        ]
    lines += [
        "",
        "## How well the causes are named",
        "",
        "Measured on blow-ups and healthy runs written from the descriptions above by people who had",
        "not read the rules: `bench/eval_causes/cases.py` (half of it used for tuning, half held out;",
        "the held-out misses were seen before the last changes), `fresh_cases.py` (written while the",
        "rules were tuned and scored once after: top-1 23/26, 88%, top-2 25/26, 96%; its three misses,",
        "learning rate against exploding gradients, were then looked at and the rules changed),",
        "`fresh2_cases.py` (written while that change was made, scored once after it: top-1 23/26,",
        "88%, top-2 23/26, 88%; two of its misses were bugs, then fixed) and `fresh3_cases.py`",
        "(written while those were fixed, scored once after: top-1 22/26, 85%, top-2 23/26, 88%,",
        "no false alarm on 10 healthy runs, the figure for runs nobody tuned on; one of its misses",
        "was fixed after). The whole story is in [cause_evaluation.md](cause_evaluation.md).",
        "Top-1 and top-2 right, false alarms (a cause or an early warning) on healthy runs, and, after a",
        "replay of the failing step, whether the remedy of the cause named first kept the step finite.",
        "The cases one by one are in [cause_evaluation.md](cause_evaluation.md); recompute both (about",
        "15 minutes on 2 cores, `make bench-causes`) with",
        "",
        "    " + EVALUATION_COMMAND,
        "",
        SUMMARY_BEGIN,
        summary.strip() or "(not measured yet)",
        SUMMARY_END,
    ]
    return "\n".join(lines) + "\n"


EVALUATION_COMMAND = ".venv/bin/python bench/eval_causes/run_eval.py --replay --out docs"
# run_eval.py writes the measured figures between these markers; the rest of the page is the table's.
SUMMARY_BEGIN, SUMMARY_END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def summary_of(page):
    """The measured block of a docs/causes.md page ('' when it has none)."""
    if SUMMARY_BEGIN not in page or SUMMARY_END not in page:
        return ""
    return page[page.index(SUMMARY_BEGIN) + len(SUMMARY_BEGIN) : page.index(SUMMARY_END)].strip()


def write_page(path, summary=None):
    """Writes docs/causes.md from the table, keeping the measured block already there unless
    `summary` replaces it."""
    if summary is None and os.path.exists(path):
        with open(path) as f:
            summary = summary_of(f.read())
    with open(path, "w") as f:
        f.write(as_markdown(summary or ""))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_page(sys.argv[2])
    else:
        print(as_markdown(), end="")
