# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint pytest clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build on this machine's disk (plain `torch` would pull CUDA)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# peers for side-by-side tests and benchmarks; torchattacks' metadata pins an old requests
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/modelshield scan --demo --out demo-scan

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

pytest: $(STAMP)
	scripts/loopback.sh $(PY) -m pytest -m 'not slow and not gpu'

test: lint pytest

clean:
	rm -rf $(VENV) demo-scan .pytest_cache .mypy_cache .ruff_cache
