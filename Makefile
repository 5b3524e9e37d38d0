# The quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use, so a fresh machine needs only Python 3.11 and PyPI.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first: a bare "torch" requirement would pull a multi-GB CUDA build on CPU-only machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/imglora demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest

.PHONY: install demo test
