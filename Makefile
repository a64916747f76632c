# Quickstart: `make demo` sets up a fresh machine (a virtualenv in .venv) and runs the embedded default run;
# `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch: an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed (ZeRO-3 under FastRFTGRPOTrainer and CausalLMWithFusedLoss; its tests), the version tested. It ships only
# a source package whose build imports torch and declares no build requirements: built against the torch above.
DEEPSPEED_SPEC ?= deepspeed==0.19.8

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,integrations]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)" "$(TORCH_SPEC)"
	touch $@

demo: setup
	$(VENV)/bin/fastrft demo

# pytest is run as a script, not `python -m pytest`: that would put the repo root on sys.path and expose
# kernels/ as a top-level `kernels` module.
test: setup
	@$(PY) -c "import fastrft._diff" || { echo "the C++ diff extension (csrc/) did not build"; exit 1; }
	$(VENV)/bin/pytest -q tests

bench: setup
	$(PY) benchmarks/bench_loss.py
	$(PY) benchmarks/bench_diff.py

clean:
	rm -rf $(VENV) build *.egg-info
