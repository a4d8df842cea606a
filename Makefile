# The README's two commands: `make demo` (set up, then run the main job on its embedded default) and
# `make test` (set up, then the whole test suite). Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ngrpo-installed
# On a machine without CUDA, torch 2.13.0's CPU wheel (an open range could pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo library-demo test bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py CMakeLists.txt csrc/loss_rows.cpp tests/requirements-verl.txt
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel "$(TORCH_SPEC)"
	NGRPO_REQUIRE_CPP=$${NGRPO_REQUIRE_CPP:-1} $(PY) -m pip install -q --disable-pip-version-check \
		--no-build-isolation -e ".[dev,train]"
	# verl's code for the plugin's tests, without verl's pins (they conflict with TRL 1.16): see the file
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r tests/requirements-verl.txt
	touch $(STAMP)

setup: $(STAMP)

# The main job on its embedded default: the tiny preset (CPU, a few minutes), then its pass@k evaluation.
demo: setup
	$(PY) -m ngrpo_train --preset tiny --algo ngrpo --output-dir outputs/tiny-ngrpo --resume auto
	$(PY) -m ngrpo_train.evaluate --model outputs/tiny-ngrpo/final --n 16 --limit 64

# The library on small examples (advantage table, one policy-loss call, one fused loss call).
library-demo: setup
	$(PY) -m ngrpo_kernels.demo

# Triton kernels run under the interpreter on CPU-only machines (the variable must be set before the
# kernels are imported). pytest exit code 5 means no test was collected: that is a failure here.
# Workers (pytest-xdist): one per core, at most 4, none on one core. The tests are single-threaded Python
# under the interpreter: on a 2-core machine the suite took 797 s with 2 workers against 1,832 s in one
# process (2026-11-28; the one-process run shared the machine with other work, so it overstates the gain).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); if [ $$n -gt 4 ]; then n=4; elif [ $$n -lt 2 ]; then n=0; fi; echo $$n)
test: setup
	@if command -v nvidia-smi >/dev/null 2>&1; then interp=0; else interp=1; fi; \
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$interp} $(PY) -m pytest tests -q -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# CPU benchmarks against the peers (pytest-benchmark), then benchmarks/RESULTS.md and results.png.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[bench]"
	$(PY) -m pytest benchmarks --benchmark-json=.benchmarks/cpu.json $(PYTEST_ARGS)
	$(PY) benchmarks/report.py .benchmarks/cpu.json --title "CPU benchmark results" >/dev/null
	@echo "wrote benchmarks/RESULTS.md and benchmarks/results.png"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
