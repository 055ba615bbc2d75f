# Entry points. `make demo` and `make test` are the README's quick start.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
PY := .venvs/tests/bin/python
DEMO_DIR := runs/demo
PYTEST_ARGS ?=
# Three test processes on two cores: the Slurm tests (all in one process, see tests/conftest.py) run jobs bound
# to one core that mostly wait on the scheduler, and the other test files (two processes) use the idle time meanwhile
# (the suite averaged 1.1 busy cores with two).
TEST_WORKERS ?= 3

.PHONY: help envs system-deps demo test lint bench soak gpu-check clean

help:
	@echo "make demo   - build .venvs/pytorch and run a 2-process torchrun recipe on this machine"
	@echo "make test   - build every environment, install system tools, run the whole test suite"
	@echo "make envs   - build (or refresh) one virtualenv per framework folder under .venvs/"
	@echo "make lint   - ruff + shellcheck + the sbatch linter"
	@echo "make bench  - benchmarks: scaling, overhead vs raw DDP, time to first step"
	@echo "make soak   - fault soak: random kill -9/SIGTERM/SIGUSR1 into pytorch+lightning+monai+modulus+jax runs (SOAK_ARGS)"
	@echo "make gpu-check - on a GPU node: every folder's CUDA paths, tiny runs, table in runs/gpu-check/ (exit 4: no GPU)"
	@echo "make clean  - remove .venvs/, runs/ and caches"

envs:
	tools/envs.sh

system-deps:
	tools/system_deps.sh

demo:
	tools/envs.sh pytorch
	rm -rf $(DEMO_DIR)
	OMP_NUM_THREADS=1 .venvs/pytorch/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \
	    pytorch/multigpu_torchrun.py --epochs 3 --checkpoint-dir $(DEMO_DIR)
	@echo "checkpoint written:"; ls -l $(DEMO_DIR)

test: envs system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: envs system-deps
	$(PY) -m pytest -m lint $(PYTEST_ARGS)

# Numbers for every framework folder. On CPU the runner first waits (up to 10 min) for a quiet machine.
# Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--repeats 3" (see benchmarks/run.py --help).
bench:
	tools/envs.sh  # every folder: the runner launches each recipe with its own environment
	.venvs/benchmarks/bin/python benchmarks/run.py --out runs/bench --wait-quiet 600 --redo-disturbed 3 --publish $(BENCH_ARGS)

# The fault soak (tests/soak.py, issue #9): random faults into the runs of every folder with MODES rows (pytorch/,
# lightning/, monai/, modulus/, jax/), each relaunched as Slurm would; a table of outcomes in runs/soak/soak.md
# (+ soak.json). Exit non-zero if any run FAILs.
# E.g. make soak SOAK_ARGS="--n 200 --seed 7 --modes pytorch/torchrun".
SOAK_ARGS ?= --n 50 --seed 1
soak:
	tools/envs.sh tests pytorch lightning monai modulus jax
	$(PY) tests/soak.py --out runs/soak $(SOAK_ARGS)

# The CUDA paths of every folder on a GPU machine (issue #22): tools/gpu_check.py (stdlib only; --help). Exit 4 and
# one line where there is no CUDA GPU. E.g. srun --gpus-per-node=8 make gpu-check GPU_CHECK_ARGS="--only pytorch/".
GPU_CHECK_ARGS ?=
gpu-check:
	python3 tools/gpu_check.py --out runs/gpu-check $(GPU_CHECK_ARGS)

clean:
	rm -rf .venvs runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
