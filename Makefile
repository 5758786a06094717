# Quickstart: `make run` trains recipes/small.yaml end to end; `make test` runs the test suite.
# Both create .venv and install the project the first time. On a machine without torch, torch==2.13.0 is installed
# first (TORCH_CPU: the CPU build where the pip index serves it; on PyPI for Linux x86-64 add
# `--index-url https://download.pytorch.org/whl/cpu`), so no other package pulls the newest CUDA build; GPU users
# install their torch into .venv (or any environment) before `make`. Other packages: the versions in
# constraints.txt, with which the README's figures were measured.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/small.yaml
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,tensorboard]"
	touch $@

run: install
	$(PY) pipeline/run.py $(RECIPE)

test: install
	$(PY) -m pytest -q --durations=20 -n auto --maxprocesses 4 --dist loadfile tests

clean:
	rm -rf runs
