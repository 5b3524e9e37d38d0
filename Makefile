# The quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use from requirements.lock (every package at the exact version the suite
# passed with, for Python 3.11 on Linux x86-64 with CPU torch), so a fresh machine needs only Python
# 3.11 and PyPI, and installs what was tested. `make lock` moves the lock forward, tested.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= requirements.lock
RUNTIME_LOCK ?= requirements-runtime.lock
# The CPU build: a bare "torch" would pull a multi-GB CUDA build on CPU-only machines.
TORCH := torch==2.13.0+cpu
UV := uv==0.13.9
UV_COMPILE = $(LOCKDIR)/tools/bin/uv pip compile pyproject.toml - --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
	--custom-compile-command "make lock" --no-progress --quiet
LOCKDIR := .lock-new

$(VENV)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) .ci/check_lock.py $(LOCK)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/imglora demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# imglora with only its own requirements, as `pip install imglora` leaves it (benchmarks/run.py --ours-python).
runtime-venv: $(RUNTIME_LOCK)
	rm -rf .bench-cache/runtime-venv
	$(PYTHON) -m venv .bench-cache/runtime-venv
	.bench-cache/runtime-venv/bin/pip install -q -r $(RUNTIME_LOCK)
	.bench-cache/runtime-venv/bin/pip install -q --no-deps -e .
	.bench-cache/runtime-venv/bin/python .ci/check_lock.py $(RUNTIME_LOCK)

# Re-resolve the newest versions within pyproject.toml's ranges, run the whole suite in a fresh venv
# built from them, and only then replace the locks. Review `git diff *.lock` before committing.
lock:
	rm -rf $(LOCKDIR) && mkdir -p $(LOCKDIR)
	$(PYTHON) -m venv $(LOCKDIR)/tools && $(LOCKDIR)/tools/bin/pip install -q $(UV)
	echo '$(TORCH)' | $(UV_COMPILE) --extra dev -o $(LOCKDIR)/$(LOCK)
	echo '$(TORCH)' | $(UV_COMPILE) -c $(LOCKDIR)/$(LOCK) -o $(LOCKDIR)/$(RUNTIME_LOCK)
	$(MAKE) test VENV=$(LOCKDIR)/venv LOCK=$(LOCKDIR)/$(LOCK)
	mv $(LOCKDIR)/$(LOCK) $(LOCK) && mv $(LOCKDIR)/$(RUNTIME_LOCK) $(RUNTIME_LOCK)
	rm -rf $(LOCKDIR)
	@echo "locks moved forward and tested: review git diff $(LOCK) $(RUNTIME_LOCK), then commit"

.PHONY: install demo test runtime-venv lock
