# Two commands a newcomer needs: `make run` (the main job on the embedded tiny model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
TORCH := torch==2.13.0

.PHONY: run test install install-dev clean

$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: $(VENV)/.runtime
	$(VENV)/bin/jaxprobe run

test: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) jaxprobe-runs
