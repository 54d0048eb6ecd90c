# trisocks: two commands from a fresh clone.
#   make run    a working forward tunnel on this machine (SOCKS5 on 127.0.0.1:9870)
#   make test   builds the virtualenv, the Cython extension and the test peers, then runs the suite
# Other targets: build, bench, lint, clean.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
EXT    := src/trisocks/wire/_relay$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PYTEST_ARGS ?=
ARGS ?=

.PHONY: all build run test bench lint clean tools dist

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel "Cython>=3.0"

# The editable install pulls runtime and test dependencies (the pinned peers
# pywssocks and linksocks among them) and compiles the extension in place.
$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Rebuild the extension when the .pyx changes, without reinstalling.
$(EXT): src/trisocks/wire/_relay.pyx $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(STAMP) $(EXT)
	@$(BIN)/trisocks version

# Tools the tests drive from the outside (curl; nginx for the benchmark smoke run and the
# deploy guide; redis-server for the shared store; chromium, its driver and zbarimg for the
# dashboard's browser tests); installed with apt when missing.
tools:
	@bash scripts/ensure-tools.sh curl nginx redis-server chromium chromedriver zbarimg

run: build
	@$(PY) scripts/run_demo.py $(ARGS)

test: build tools
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/run.py $(ARGS)

# pywssocks 1.5.1's own tests/test_cli.py (from its sdist) with trisocks as server, client
# and both; writes conformance-report.md (scripts/conformance/run.py says more).
.PHONY: conformance
conformance: build
	$(PY) scripts/conformance/run.py $(ARGS)

# The attack suite (tests/support/attack.py) against real server, client, reverse server and
# provider processes with another user's 100 MiB downloads alongside, then atheris on the parsers;
# FUZZ_SECONDS long (ARGS=--without-known leaves out issue 9's row inputs). Short form in make test.
FUZZ_SECONDS ?= 600
.PHONY: fuzz
fuzz: build tools
	$(PY) scripts/fuzz.py --seconds $(FUZZ_SECONDS) $(ARGS)

# Mixed load for SOAK_SECONDS, RSS and fds sampled every 10 s; report (JSON, Markdown, SVG) in
# .soak/. Its 60 s form is in make test (tests/test_soak.py).
SOAK_SECONDS ?= 600
.PHONY: soak
soak: build tools
	$(PY) scripts/soak.py --seconds $(SOAK_SECONDS) $(ARGS)

# An sdist and a wheel with the compiled extension in dist/, made with this virtualenv's
# setuptools and Cython (no download); the wheel build fails rather than fall back to the pure
# hot path. Install them with pip or pipx (docs/deploy.md).
dist: $(STAMP)
	rm -rf dist
	TRISOCKS_REQUIRE_COMPILED=1 $(PY) -m build --no-isolation --outdir dist .
	@ls -l dist

lint: build
	$(PY) -m pip install --quiet ruff
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf build dist src/*.egg-info src/trisocks/wire/_relay.c src/trisocks/wire/_relay*.so .pytest_cache
