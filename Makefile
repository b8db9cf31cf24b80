# fedcare: every target creates/uses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedcare-installed

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: on this machine kind it takes the local CPU wheel.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The main job: 4 real hospitals (Fed-Heart-Disease), DP-SGD, Flower Simulation Engine.
## Each demo starts with fresh simulated hospitals (their ledgers live in runs/demo/ledgers).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedcare simulate --output-dir runs/demo

## Everything the CI runs: 2 workers, each test file on one of them (its module fixtures start
## a federation once); the real-process tests spend most of their time waiting on each other.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/bench_heart_accuracy.py --seeds 5 --write docs/benchmarks.md
	$(BIN)/python bench/bench_heart_dp_ablation.py --seeds 10 --write docs/benchmarks.md
	$(BIN)/python bench/bench_heart_dp_ablation.py --sweep --seeds 10 --write docs/benchmarks.md
	$(BIN)/python bench/bench_dicom_decode.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_secure_aggregation.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_dp_speed.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) runs .pytest_cache
