# make test: a virtualenv with everything the tests need, Chromium from Debian, then pytest.
# make demo: a venv with only what the demo needs (requirements-demo.txt), then demo/serve.py:
# TensorBoard on 127.0.0.1:$(PORT) at once, the first run (scenario F) in seconds, the rest while it serves.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 6006
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
DEMO_STAMP = $(VENV)/.demo-installed
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint format demo demo-retrain bench bench-plugin bench-gpu chromium setup clean

setup: $(STAMP)

$(STAMP): setup.py requirements-test.txt requirements-tfkeras.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -r requirements-tfkeras.txt
	$(BIN)/pip install -q -e .
	touch $@

chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

test: lint $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

# ruff (format + check, ruff.toml) for Python, eslint (eslint.config.mjs) for frontend/.
lint: $(STAMP) node_modules/.installed
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	npx --no-install eslint frontend

format: $(STAMP) node_modules/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	npx --no-install eslint --fix frontend

# The demo's own stamp: TensorFlow and TensorBoard, none of the test tools.  A venv that
# `make setup` made already has them (pip then only checks).
$(DEMO_STAMP): setup.py requirements-demo.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-demo.txt
	$(BIN)/pip install -q -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/python demo/serve.py --port $(PORT)

demo-retrain: $(DEMO_STAMP)
	$(BIN)/python demo/run_all.py --retrain

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

bench-plugin: $(STAMP)
	$(BIN)/python bench/plugin_scale.py

# How well the causes are named (docs/causes.md, docs/cause_evaluation.md): about 15 minutes.
bench-causes: $(STAMP)
	$(BIN)/python bench/eval_causes/run_eval.py --replay --out docs

# On a CUDA machine: its own venv (tensorflow[and-cuda], keras-hub), then ResNet50, GPT-2 and an
# XLA Transformer against plain fit.  GPU_CHECK_CPU_SMOKE=1: tiny sizes on the CPU.
bench-gpu:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info node_modules
