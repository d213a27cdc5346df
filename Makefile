# tomoml_nb — the two set-up commands of README.md, and helpers.
#   make demo    create .venv, install, run the getting-started and reconstruction notebooks into reports/
#   make test    create/update .venv, run unit tests and every notebook at smoke size
#   make bench   run benchmarks/ and write BENCHMARKS.md
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel of torch where one is provided locally; on a GPU machine the same pin gives the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.tomoml-installed
DEMO_NOTEBOOKS := notebooks/00_getting_started.ipynb notebooks/01_reconstruction.ipynb
PYTEST_ARGS ?=

.PHONY: demo test test-unit test-notebooks bench doctor lab clean-reports help

help:
	@sed -n '2,5p' Makefile

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned, so that no dependency pulls a multi-GB CUDA build on a CPU machine
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (tomoml_nb)" >/dev/null
	@touch $(STAMP)

demo: $(STAMP)
	@for nb in $(DEMO_NOTEBOOKS); do \
	  $(BIN)/tomoml report $$nb -o reports || exit 1; \
	done
	@echo; echo "Reports written to $(CURDIR)/reports/ (open the .html files in any browser, offline)."

test: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest tests --doctest-modules tomoml_nb $(PYTEST_ARGS)

test-unit: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest tests --ignore=tests/notebooks --doctest-modules tomoml_nb $(PYTEST_ARGS)

test-notebooks: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest tests/notebooks $(PYTEST_ARGS)

# the reconstruction benchmark compares against astra-toolbox: installed here only (the `astra` extra)
bench: $(STAMP)
	$(BIN)/pip install -e ".[astra]" || echo "astra-toolbox not installable here: its rows will say 'not installed'"
	MPLBACKEND=Agg $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

doctor: $(STAMP)
	$(BIN)/tomoml doctor

lab: $(STAMP)
	$(BIN)/pip install -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

clean-reports:
	rm -rf reports/
