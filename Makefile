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

# The demo: Fashion-MNIST, 100 labels, on the CPU: a VAE, then sup / vat / lvat-vae compared.
demo: fashion-mnist
	$(BIN)/lvat data check fashion-mnist
	$(BIN)/lvat demo --out runs/demo

# docs/results.md: Fashion-MNIST SSL, 100 and 1,000 labels, 3 label seeds, eps chosen on
# validation; about 2 h 10 min on 2 CPU cores (two sweep processes, one core each). The second pass
# picks up LVAT runs that waited for the other process's transformer fit; finished runs skip.
RESULTS := runs/fashion-mnist-results/fashion-mnist
SWEEP   := OMP_NUM_THREADS=1 $(BIN)/lvat sweep configs/sweeps/fashion-mnist.toml
CHOSEN  := $(RESULTS)/sup $(RESULTS)/vat/*_eps2 $(RESULTS)/lvat-vae/*_eps0.5 \
           $(RESULTS)/lvat-glow/*_eps0.5
FIGURES := vat/num_labeled100_eps2 lvat-vae/num_labeled100_eps0.5 lvat-glow/num_labeled100_eps0.5
.PHONY: results
results: fashion-mnist
	for pass in 1 2; do $(SWEEP) --shard 0/2 & $(SWEEP) --shard 1/2; wait; done
	$(BIN)/lvat report $(RESULTS)/*/*/seed0 --metric validation --out docs/results/eps-search
	$(BIN)/lvat report $(RESULTS)/*/*/seed0 --out docs/results/eps-search-test
	$(BIN)/lvat report $(CHOSEN) --out docs/results/table
	for run in $(FIGURES); do \
	  $(BIN)/lvat figures $(RESULTS)/$$run/seed0 --samples 5000 --eps-vat 2 \
	    --transformer runs/fit/fashion-mnist-vae/checkpoint.pt && \
	  mkdir -p docs/results/$${run%%/*} && cp $(RESULTS)/$$run/seed0/figures/* docs/results/$${run%%/*}/; \
	done

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
