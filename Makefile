# raycf: `make demo` runs the embedded study, `make test` the suite (and builds the docs with mkdocs --strict),
# `make bench` the CPU benchmarks, `make bench-gpu` the GPU ones, `make bench-scaling` the stages' cost growth on
# Fashion-MNIST (measured times: docs/benchmarks.md), `make docs` serves the documentation site.
# Each builds .venv first with python3.11 (pinned torch/torchvision/ray; about 6 GB, about 3 minutes).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu bench-scaling docs venv system-packages clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@$(BIN)/raycf study studies/digits.yaml
	@$(BIN)/raycf leaderboard results/digits --top 5

system-packages:
	./.ci/system-packages.sh

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q --durations=15 -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu

bench-scaling: $(STAMP) system-packages
	$(BIN)/python -m benchmarks.scaling

docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) results .pytest_cache site
