"""A GPT-2-like keras_hub causal LM, whose `token_embedding` runs twice per step (the lookup,
then the logits with `reverse=True`): a site per call, named and placed as it ran.

    .venv/bin/python bench/keras_hub_calls.py      # ~1 min on 2 cores; needs keras_hub

keras_hub is not a test requirement: without it the script says so and exits 0.  Checks, each
printed with PASS/FAIL (exit status 1 if any fails):
  1. the embedding's two calls are two sites: the lookup first in forward order, the logits
     (`... (call 2)`) last; backward in reverse; its weights one site per variable;
  2. weights and optimizer state after 3 steps equal plain fit's bitwise (op determinism);
  3. an overflow in the final layer norm (gamma 1e38) is named there, not at the embedding,
     whose first call came before it in the step.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import keras_hub
except ImportError:
    print("keras_hub is not installed: skipped")
    sys.exit(0)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tb_nanwatch  # noqa: E402

VOCAB, LENGTH, BATCH, STEPS = 64, 8, 8, 3


def build():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return lm


def data():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH * STEPS, LENGTH))
    tokens = tokens.astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, dtype=bool)}
    return x, np.roll(tokens, -1, axis=1)


def fit(lm, callbacks=()):
    x, y = data()
    lm.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    values = [v.numpy() for v in lm.variables + lm.optimizer.variables]
    return values


def main():
    tf.config.experimental.enable_op_determinism()
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print("%s  %s%s" % ("PASS" if ok else "FAIL", name, ": " + detail if detail else ""))

    logdir = tempfile.mkdtemp(prefix="nanwatch_keras_hub_")
    plain = fit(build())
    callback = tb_nanwatch.NanWatchCallback(os.path.join(logdir, "gpt2"), log_every=1)
    lm = build()
    watched = fit(lm, [callback])
    # The backbone's name is numbered per model built in the process (gpt2_backbone_1, ...).
    embedding = lm.backbone.name + "/token_embedding"
    sites = callback.watch.sites
    forward = [s["layer"] for s in sites if s["kind"] == "activation"]
    backward = [s["layer"] for s in sites if s["kind"] == "activation_grad"]
    calls = [embedding, embedding + " (call 2)"]
    check(
        "the embedding's calls are two sites, in execution order",
        forward[0] == calls[0]
        and forward[-1] == calls[1]
        and [c for c in backward if c in calls] == calls[::-1],
        "forward %s ... %s; %d sites" % (forward[0], forward[-1], len(sites)),
    )
    weights = [s for s in sites if s["layer"] == embedding and s["kind"] == "weight"]
    check("its weights: one site per variable", len(weights) == 1, str(len(weights)))
    differ = [i for i, (a, b) in enumerate(zip(plain, watched)) if a.tobytes() != b.tobytes()]
    check(
        "weights and optimizer state equal plain fit's bitwise",
        len(plain) == len(watched) and not differ,
        "%d of %d differ" % (len(differ), len(plain)),
    )

    lm = build()
    norm = lm.backbone.get_layer("layer_norm")
    norm.gamma.assign(np.full(norm.gamma.shape, 1e38, "float32"))
    callback = tb_nanwatch.NanWatchCallback(os.path.join(logdir, "overflow"), log_every=1)
    fit(lm, [callback])
    first = callback.watch.first_nonfinite or {}
    check(
        "an overflow in the final layer norm is named there",
        (first.get("layer"), first.get("kind")) == (lm.backbone.name + "/layer_norm", "activation"),
        "%s, %s" % (first.get("layer"), first.get("kind")),
    )
    print("logs: %s (tb-nanwatch report %s)" % (logdir, logdir))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
