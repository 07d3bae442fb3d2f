# One target per build flavour (pydantic-core / uvloop style).
PY ?= python3

.PHONY: build-dev build-release build-debug annotate test test-pure fuzz-smoke bench-micro bench-load perf-gate wheel clean

build-dev:            ## compile both extensions in place (editable install)
	$(PY) -m pip install -e '.[test]'

build-release:        ## a wheel in dist/
	$(PY) -m build --wheel

build-debug:          ## DISPA_DEBUG counters, Cython line tracing, Rust debug
	DISPA_DEBUG=1 $(PY) -m pip install -e '.[test]'

annotate:             ## Cython HTML annotation next to the sources
	DISPA_ANNOTATE=1 $(PY) setup.py build_ext --inplace

test:                 ## the README test command
	bash ci/test.sh

test-pure:
	DISPA_NO_EXTENSIONS=1 $(PY) -m pytest -q tests/unit tests/fuzz tests/integration

fuzz-smoke:
	$(PY) tests/fuzz/fuzz_http1.py --seconds 30

bench-micro:
	$(PY) -m pytest perf/micro --benchmark-only

bench-load:
	$(PY) perf/load/run.py

perf-gate:
	$(PY) ci/perf_gate.py

wheel: build-release

clean:
	rm -rf build dist *.egg-info dispa/*.so _native/*.c _native/*.html rust/target
