# robust_agc: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch pinned to the release these machines carry (a pip constraint caps it here); override elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP  := $(VENV)/.installed
# adv-lib (dev extra: the fmn cross-check) needs visdom, built from source with setuptools<81
# (pkg_resources): build-constraints.txt.
DEMO_OUT ?= runs/demo
# The demo's evaluation runs on DEMO_PROCS processes (torchrun, gloo, one thread each); the result
# is the one a single process gives with the same --batch-size.
DEMO_PROCS ?= 2
PYTEST_ARGS ?=

.PHONY: install data demo test test-slow mutation bit-identity lint format bench gpu-smoke gpu-verify clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml build-constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --build-constraint build-constraints.txt -e '.[dev]'
	touch $@

# The embedded default dataset: Fashion-MNIST from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	  else \
	    echo "Fashion-MNIST not found: install dataset-fashion-mnist (Debian), or use --data-dir / --download"; \
	  fi; \
	fi

install: $(STAMP) data

demo: install
	$(BIN)/python -m robust_agc train --config experiments/configs/demo.yaml --out $(DEMO_OUT) --overwrite
	$(BIN)/torchrun --standalone --nproc-per-node $(DEMO_PROCS) -m robust_agc eval $(DEMO_OUT)/best.pt \
	  --attacks clean,pgd,autoattack --n-examples 200 --batch-size 16 --pgd-steps 20 --pgd-restarts 1 \
	  --seed 0 --out $(DEMO_OUT)/eval.json --overwrite
	$(BIN)/python -m robust_agc report $(DEMO_OUT) $(DEMO_OUT)/eval.json --out $(DEMO_OUT)/report
	@echo "run stored in $(DEMO_OUT); report in $(DEMO_OUT)/report/report.md"

test: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: install
	RUN_SLOW=1 $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Mutation testing of the core modules, group by group (tests/mutation.py; shared settings in
# pyproject's [tool.mutmut]). Slow (hours on 2 cores), so not in CI; resumable. Results and the
# reason for every survivor: tests/MUTATION.md. `make mutation MUTATION_GROUPS=optim` runs one group.
MUTATION_JOBS ?= 2
MUTATION_GROUPS ?=
mutation: install
	$(BIN)/python -m pip install -q -e '.[mutation]'
	$(BIN)/python tests/mutation.py run --fast --jobs $(MUTATION_JOBS) $(MUTATION_GROUPS)
	$(BIN)/python tests/mutation.py report --list survived "no tests" timeout suspicious

# Same configs, this tree against the code of REF (default: HEAD), on this machine: weights,
# metrics and an evaluation record must agree bit for bit (tests/bit_identity.py; a few minutes).
REF ?= HEAD
bit-identity: install
	$(BIN)/python tests/bit_identity.py --ref $(REF)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/attack_speed.py
	$(BIN)/python benchmarks/agc_overhead.py
	$(BIN)/python benchmarks/sparse_overhead.py
	$(BIN)/python benchmarks/eval_speed.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mutation

# For a machine with one CUDA GPU (not CI): benchmarks/gpu_verify.sh says what each target runs.
# GPU_PYTHON: the interpreter that holds a CUDA torch and the project's needs.
GPU_PYTHON ?= $(BIN)/python
GPU_LOGS ?= runs/gpu-logs
gpu-smoke:
	GPU_PYTHON=$(GPU_PYTHON) sh benchmarks/gpu_verify.sh smoke

gpu-verify:
	GPU_PYTHON=$(GPU_PYTHON) sh benchmarks/gpu_verify.sh all $(GPU_LOGS)
