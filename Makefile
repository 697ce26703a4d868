# Everything runs from a virtual environment this Makefile creates; a fresh machine needs
# only Python 3.10+ (and, for `make bench`, Debian packages it installs itself).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test crashtest fuzz bench lint fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) bench/demo.py

# Most tests run the command line in a subprocess: with PYTHONDONTWRITEBYTECODE set (as in
# many CI environments) each one would compile the package again, so compile it once first.
test: $(STAMP)
	$(PY) -m compileall -q sparsepatch
	$(PY) -m pytest -q

# Power cuts at every point of apply, resumed: the full set (`make test` runs a sample).
crashtest: $(STAMP)
	$(PY) tests/crashsim.py --min-states 10000

fuzz: $(STAMP)
	$(PY) tests/fuzz_main.py --cases 10000

# The peers bench/bench.py compares against, and debootstrap for its OS images (workloads 5
# and 6); installed when missing and running as root, otherwise the benchmark skips what needs
# them (and says so).
BENCH_PEERS := rsync rdiff xdelta3 debootstrap

bench: $(STAMP)
	@missing=""; for p in $(BENCH_PEERS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y $(BENCH_PEERS) || { apt-get update && apt-get install -y $(BENCH_PEERS); } \
	      || echo "bench: could not install$$missing: skipped"; \
	  else echo "bench: not root, so not installing$$missing: skipped"; fi; \
	fi
	$(PY) bench/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sparsepatch tests bench
	$(VENV)/bin/mypy sparsepatch

fixtures: $(STAMP)
	$(PY) tests/make_fixtures.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
