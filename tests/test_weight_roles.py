"""Weight rules by role, not by the name `kernel`: an embedding table, a recurrent kernel or a
normalisation scale initialised far too large is named as the cause (not the symptom,
exploding_gradients), and healthy models with such weights get no cause."""

import logging

import keras
import numpy as np
import pytest

import tb_nanwatch
from tb_nanwatch import diagnosis, reader, stats

L = keras.layers


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("tb_nanwatch").setLevel(logging.ERROR)
    yield
    logging.getLogger("tb_nanwatch").setLevel(logging.NOTSET)


def train(tmp_path, layers, optimizer, epochs=2):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(512, 12))
    y = rng.normal(size=(512, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,), dtype="int32")] + layers)
    model.compile(optimizer, "mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    model.fit(tokens, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[callback])
    provider, ctx, eid = reader.open_logdir(str(tmp_path))
    return callback, reader.read_run(provider, ctx, eid, "run")


def first_cause(rd):
    found = diagnosis.diagnose(rd)
    assert found, "no cause"
    return found[0], rd.sites[rd.site_index(**found[0]["sites"][0])]


def test_a_huge_embedding_table_is_the_cause(tmp_path):
    huge = keras.initializers.RandomNormal(stddev=100.0)
    layers = [L.Embedding(50, 16, embeddings_initializer=huge), L.GlobalAveragePooling1D()]
    layers += [L.Dense(16, activation="relu"), L.Dense(1)]
    callback, rd = train(tmp_path, layers, keras.optimizers.SGD(0.01))
    assert callback.watch.first_nonfinite is not None
    cause, site = first_cause(rd)
    assert cause["cause"] == "large_initial_weights", diagnosis.diagnose(rd)
    assert (site["tensor"], site["role"]) == ("embeddings", "embedding")
    assert site["layer"].startswith("embedding")
    assert "embedding table" in cause["evidence"]


def test_a_recurrent_kernel_compounds_over_the_time_steps(tmp_path):
    big = keras.initializers.RandomNormal(stddev=3.0)
    layers = [L.Embedding(50, 8), L.SimpleRNN(16, activation="relu", recurrent_initializer=big)]
    callback, rd = train(tmp_path, layers + [L.Dense(1)], keras.optimizers.SGD(0.01))
    assert callback.watch.first_nonfinite is not None
    cause, site = first_cause(rd)
    assert cause["cause"] == "large_initial_weights", diagnosis.diagnose(rd)
    assert (site["tensor"], site["role"]) == ("recurrent_kernel", "recurrent_kernel")
    assert "each of the 12 time steps" in cause["evidence"]


def test_a_huge_normalisation_scale_is_the_cause(tmp_path):
    gamma = keras.initializers.Constant(1e8)
    layers = [L.Embedding(50, 16), L.LayerNormalization(gamma_initializer=gamma)]
    layers += [L.GlobalAveragePooling1D(), L.Dense(16, activation="relu"), L.Dense(1)]
    callback, rd = train(tmp_path, layers, keras.optimizers.SGD(0.01))
    cause, site = first_cause(rd)
    assert cause["cause"] == "large_initial_weights", diagnosis.diagnose(rd)
    assert (site["tensor"], site["role"]) == ("gamma", "norm_scale")


@pytest.mark.parametrize("name", ["embedding_lstm", "embedding_layernorm_gru"])
def test_healthy_models_with_every_role_get_no_cause(tmp_path, name):
    if name == "embedding_lstm":
        layers = [L.Embedding(50, 8), L.LSTM(16), L.Dense(1)]
    else:
        layers = [L.Embedding(50, 16), L.LayerNormalization(), L.GRU(16), L.Dense(1)]
    callback, rd = train(tmp_path, layers, "adam", epochs=3)
    assert callback.watch.first_nonfinite is None
    roles = {stats.weight_role(s) for s in rd.sites if s["kind"] == "weight"}
    assert {"embedding", "recurrent_kernel", "kernel", "bias"} <= roles
    assert diagnosis.diagnose(rd) == []


def test_roles_of_logs_written_before_roles_come_from_the_names():
    def site(tensor, shape, **extra):
        return dict(layer="x", kind="weight", tensor=tensor, shape=shape, **extra)

    assert stats.weight_role(site("embeddings", [50, 8])) == "embedding"
    assert stats.weight_role(site("recurrent_kernel", [16, 64])) == "recurrent_kernel"
    assert stats.weight_role(site("gamma", [16])) == "norm_scale"
    assert stats.weight_role(site("my_table", [4, 4])) == "matrix"  # a custom add_weight
    assert stats.weight_role(site("scale", [4])) == "vector"
    assert stats.weight_role(site("velocity/embeddings", [50, 8])) == "embedding"
    # What the writer recorded wins over the name; a malformed role is ignored.
    assert stats.weight_role(site("w", [4, 4], role="embedding")) == "embedding"
    assert stats.weight_role(site("kernel", [4, 4], role=["bad"])) == "kernel"


class Scaled(keras.layers.Layer):
    """A custom layer whose weight is made by add_weight under a name of its own."""

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=1000.0)
        self.mixing = self.add_weight(name="mixing", shape=(input_shape[-1], 8), initializer=init)

    def call(self, x):
        return keras.ops.relu(x @ self.mixing)


def test_a_custom_add_weight_is_judged_as_a_matrix(tmp_path):
    tokens = L.Embedding(50, 8, embeddings_initializer="random_normal")
    layers = [tokens, L.GlobalAveragePooling1D(), Scaled(), L.Dense(1)]
    callback, rd = train(tmp_path, layers, keras.optimizers.SGD(0.01))
    assert callback.watch.first_nonfinite is not None
    cause, site = first_cause(rd)
    assert cause["cause"] == "large_initial_weights", diagnosis.diagnose(rd)
    assert (site["tensor"], site["role"]) == ("mixing", "matrix")


class LinearCell(keras.layers.Layer):
    """A custom RNN cell that keeps its weights under attributes of its own, named by role."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size = units, units

    def build(self, input_shape):
        self.w_in = self.add_weight(name="kernel", shape=(input_shape[-1], self.units))
        self.w_state = self.add_weight(
            name="recurrent_kernel", shape=(self.units, self.units), initializer="orthogonal"
        )

    def call(self, x, states):
        h = x @ self.w_in + states[0] @ self.w_state
        return h, [h]


def test_a_custom_cells_weights_get_their_role_from_their_names(tmp_path):
    """The writer knows a weight's role from the layer attribute that holds it, else from the
    name it was given (the cell's `w_state` is its recurrent kernel)."""
    layers = [L.Embedding(50, 4), L.RNN(LinearCell(8)), L.Dense(1)]
    _, rd = train(tmp_path, layers, keras.optimizers.SGD(0.001), epochs=1)
    roles = {s["tensor"]: s["role"] for s in rd.sites if s["kind"] == "weight"}
    assert roles["recurrent_kernel"] == "recurrent_kernel"
    assert roles["embeddings"] == "embedding"
