# The two commands: `make demo` and `make test`. Each creates .venv on first use.
# torch==2.13.0 is installed first, on its own: any looser spec could pull CUDA wheels.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint format fashion-mnist venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST: Debian's package when we can install it (root + apt), else a verified download.
fashion-mnist: $(STAMP)
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else $(BIN)/lvat data download fashion-mnist; fi; \
	fi

# The demo: Fashion-MNIST, 100 labels, on the CPU: sup / vat / lvat-vae compared, the
# LVAT runs with the transformers lvat ships (src/lvat/weights/); one process per core.
demo: fashion-mnist
	$(BIN)/lvat data check fashion-mnist
	$(BIN)/lvat demo --out runs/demo

# docs/results.md: the study of configs/sweeps/fashion-mnist-study.toml (LVAT vs VAT, Fashion-MNIST,
# 100 and 1,000 labels, 5 label seeds), then label seeds 5 and 6 for VAT and LVAT-Glow with 100
# labels (configs/sweeps/fashion-mnist-more-seeds.toml), then its budget check at twice the updates
# (configs/sweeps/fashion-mnist-budget.toml) and at four times (fashion-mnist-budget-4800.toml,
# 1,000 labels, 5 label seeds), and sup and VAT at eight times (fashion-mnist-budget-9600.toml).
# Prints what is left and its time estimate, runs it in two processes of one core each (finished
# runs, committed under results/, are skipped; a stop loses at most 120 updates of a run; the
# label seeds 1-4 start once the eps search they depend on has finished, in either process), then
# redraws the reports from every finished run. The study alone took 32.6 core-hours and the budget
# checks about 30 more (docs/results.md, "The budget and its cost"): run it in the background and
# commit results/ as runs finish.
STUDY := configs/sweeps/fashion-mnist-study.toml
MORE := configs/sweeps/fashion-mnist-more-seeds.toml
BUDGET := configs/sweeps/fashion-mnist-budget.toml
BUDGET4800 := configs/sweeps/fashion-mnist-budget-4800.toml
BUDGET9600 := configs/sweeps/fashion-mnist-budget-9600.toml
SWEEP := OMP_NUM_THREADS=1 $(BIN)/lvat sweep
.PHONY: results results-report
results: fashion-mnist
	$(BIN)/lvat sweep $(STUDY) --dry-run | head -n 2
	$(BIN)/lvat sweep $(MORE) --dry-run | head -n 2
	$(BIN)/lvat sweep $(BUDGET) --dry-run | head -n 2
	$(BIN)/lvat sweep $(BUDGET4800) --dry-run | head -n 2
	$(BIN)/lvat sweep $(BUDGET9600) --dry-run | head -n 2
	($(SWEEP) $(STUDY) --shard 0/2 --wait 60 && $(SWEEP) $(MORE) --shard 0/2 && \
	  $(SWEEP) $(BUDGET) --shard 0/2 && $(SWEEP) $(BUDGET4800) --shard 0/2 && \
	  $(SWEEP) $(BUDGET9600) --shard 0/2) & \
	($(SWEEP) $(STUDY) --shard 1/2 --wait 60 && $(SWEEP) $(MORE) --shard 1/2 && \
	  $(SWEEP) $(BUDGET) --shard 1/2 && $(SWEEP) $(BUDGET4800) --shard 1/2 && \
	  $(SWEEP) $(BUDGET9600) --shard 1/2); wait
	$(MAKE) results-report

# The reports alone, from the finished runs under results/ (seconds): the eps search on
# validation; test error of every run with curves and the convergence check; the study's result,
# each method at its chosen eps with the paired LVAT - VAT (and VAT - sup) differences, then the
# same without label seed 0, the seed whose runs chose eps (their selection flatters them); and the
# budget check (the study's runs beside the same settings at twice the updates, on validation),
# and its test error with the paired differences at 2,400 updates (1,000 labels, 5 label seeds);
# then test and validation error at 4,800 updates beside 2,400 (1,000 labels; each paired
# difference over the label seeds both rows have run), and sup's and VAT's at 9,600 beside every
# method's at 4,800.
results-report: $(STAMP)
	$(BIN)/lvat report results/study --metric validation --out docs/results/study-validation
	$(BIN)/lvat report results/study --out docs/results/study
	$(BIN)/lvat report results/study --chosen --out docs/results/study-chosen \
	  --paired "LVAT-VAE:VAT" --paired "LVAT-Glow:VAT" --paired "VAT:sup"
	$(BIN)/lvat report results/study --chosen --seeds 1,2,3,4,5,6 --out docs/results/study-chosen-unsearched \
	  --paired "LVAT-VAE:VAT" --paired "LVAT-Glow:VAT" --paired "VAT:sup"
	if find results/budget -name results.json 2>/dev/null | grep -q .; then $(BIN)/lvat report results/study results/budget \
	  --metric validation --out docs/results/budget \
	  --paired "sup 2400 updates:sup 1200 updates" \
	  --paired "VAT eps=1 2400 updates:VAT eps=1 1200 updates" \
	  --paired "VAT eps=0.125 2400 updates:VAT eps=0.125 1200 updates" \
	  --paired "LVAT-VAE eps=4 2400 updates:LVAT-VAE eps=4 1200 updates" \
	  --paired "LVAT-Glow eps=0.5 2400 updates:LVAT-Glow eps=0.5 1200 updates" && \
	  $(BIN)/lvat report results/budget --out docs/results/budget-test \
	  --paired "LVAT-VAE:VAT eps=0.125" --paired "LVAT-Glow:VAT eps=0.125" --paired "VAT eps=0.125:sup" \
	  --paired "LVAT-Glow:VAT eps=1"; fi
	if find results/budget-4800 -name results.json 2>/dev/null | grep -q .; then \
	  $(BIN)/lvat report results/budget results/budget-4800 --out docs/results/budget-4800 \
	  --paired "sup 4800 updates:sup 2400 updates" \
	  --paired "VAT eps=0.125 4800 updates:VAT eps=0.125 2400 updates" \
	  --paired "LVAT-VAE 4800 updates:LVAT-VAE 2400 updates" \
	  --paired "LVAT-Glow 4800 updates:LVAT-Glow 2400 updates" \
	  --paired "LVAT-Glow 4800 updates:VAT eps=0.125 4800 updates" \
	  --paired "LVAT-VAE 4800 updates:VAT eps=0.125 4800 updates" \
	  --paired "VAT eps=0.125 4800 updates:sup 4800 updates" && \
	  $(BIN)/lvat report results/budget results/budget-4800 --metric validation \
	  --out docs/results/budget-4800-validation; fi
	if find results/budget-9600 -name results.json 2>/dev/null | grep -q .; then \
	  $(BIN)/lvat report results/budget-4800 results/budget-9600 --out docs/results/budget-9600 \
	  --paired "sup 9600 updates:sup 4800 updates" \
	  --paired "VAT 9600 updates:VAT 4800 updates" \
	  --paired "VAT 9600 updates:sup 9600 updates" \
	  --paired "LVAT-Glow:VAT 9600 updates" \
	  --paired "LVAT-Glow:sup 9600 updates" && \
	  $(BIN)/lvat report results/budget-4800 results/budget-9600 --metric validation \
	  --out docs/results/budget-9600-validation --paired "sup 9600 updates:sup 4800 updates" \
	  --paired "VAT 9600 updates:VAT 4800 updates"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint fashion-mnist
	LVAT_REQUIRE_DATA=1 $(BIN)/python -m pytest

# The float comparisons (tests marked `numerics`) again under other CPU code paths of this
# machine: ATen's kernel level, oneDNN's instruction set cap and MKL's code branch each change the
# last bits of results, as another CPU model would. A tolerance tuned to one CPU fails here.
# About 2 minutes on 2 cores. .ci/run runs it after make test.
NUMERICS_LEGS := "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2" \
                 "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1"
.PHONY: test-numerics
test-numerics: fashion-mnist
	@for leg in $(NUMERICS_LEGS); do \
	  echo "== numerics leg: $$leg"; \
	  env $$leg $(BIN)/python -c 'import json; from lvat.environment import cpu_code_path; print(json.dumps(cpu_code_path()))' && \
	  env $$leg LVAT_REQUIRE_DATA=1 $(BIN)/python -m pytest -m numerics -p no:cacheprovider || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Training-step benchmark on this machine's device (GPU if present): ours vs a naive port,
# plus the sup-160 reference; writes bench/cpu.json or bench/cuda.json. About 6 min on 2 idle CPU
# cores. A quick look: make bench BENCH_FLAGS="--models conv-small --methods sup,vat".
.PHONY: bench
bench: $(STAMP)
	$(BIN)/lvat bench $(BENCH_FLAGS)

# The GPU study (README "Speed"): on one GPU in 8 minutes (--budget-s), `lvat bench` of the study's
# setting (writes bench/cuda.json), then sup / VAT / LVAT-Glow on Fashion-MNIST (configs/gpu-study,
# a short Glow fit first unless fashion-mnist/glow ships) with as many updates as the bench says
# fit, `lvat report`, and runs/gpu-study/summary.{json,md}. Off a GPU it refuses after the bench:
# the budget leaves too few updates. Where torch is installed but no venv can be made (an offline
# GPU machine; lvat's own dependencies importable):
#   make gpu-study LVAT="PYTHONPATH=src python3 -m lvat" GPU_STUDY_FLAGS="--data-root DIR --archive F"
LVAT ?= $(BIN)/lvat
.PHONY: gpu-study
gpu-study: $(if $(filter $(BIN)/lvat,$(LVAT)),fashion-mnist)
	$(LVAT) gpu-study $(GPU_STUDY_FLAGS)
