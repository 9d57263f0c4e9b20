# The two quick-start targets; each creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# mkdocs-material prints an end-of-life banner on every build; it is not a build warning
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint docs peers data

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test,benchmarks,zoo,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python benchmarks/continual.py --quick

test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --site-dir .cache/site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The documentation site at http://127.0.0.1:8000, rebuilt on every change.
docs: $(STAMP)
	$(BIN)/mkdocs serve

# Speed against the authors' sinkhorn-rebasin and snimu's rebasin (their venvs go to .cache/peers/).
peers: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/peers.py

# Real Fashion-MNIST for the benchmarks (Debian's package; as root). Tests never need it.
data:
	apt-get update && apt-get install -y dataset-fashion-mnist
