# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs (torch pinned to the CPU wheel for development).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# make bench BENCH_ARGS=--quick (see python -m benchmarks --help); none: the full suite into docs/perf
BENCH_ARGS ?=
# torchvision's release for the torch pin (tests/zoo, experiments/model_zoo.py)
TORCHVISION_PIN ?= torchvision==0.28.0

.PHONY: install test demo bench zoo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" "$(TORCHVISION_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m kalmannorm demo

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

zoo: install
	$(PY) experiments/model_zoo.py

clean:
	rm -rf $(VENV) runs build *.egg-info
