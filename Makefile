# Two commands: `make demo` and `make test`. Each sets up what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
STUDY_OUT ?= study_out
# GPU=1 (make setup|demo|test GPU=1): also JAX with its CUDA plugin (requirements-gpu.txt), and
# "jax" written to .venv/keras-backend, which every script reads (dqc/runtime.py; --backend or
# KERAS_BACKEND still win). Only on a machine with an NVIDIA GPU: elsewhere one line, no install.
GPU ?=
GPU_STAMP := $(VENV)/.installed-gpu
HAVE_NVIDIA_GPU = $(shell (nvidia-smi -L 2>/dev/null | grep -q '^GPU') || \
	ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1 && echo yes)
DRY_RUN = $(findstring n,$(firstword -$(MAKEFLAGS)))
GPU_PACKAGES = $(shell sed -e 's/\#.*//' requirements-gpu.txt)
# The JAX set of make test: compiled XLA programs are kept for the next run and shared by the
# set's processes (the same tiny model is compiled many times otherwise: 3 min -> 1.5 min).
JAX_TEST_ENV := KERAS_BACKEND=jax JAX_COMPILATION_CACHE_DIR=$(abspath $(VENV))/jax-cache \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# make test on every core: the tests that share an expensive fixture run in one worker, the
# longest groups first (tests/conftest.py); XDIST= runs it in one process.
XDIST ?= -n auto --dist loadgroup --no-loadscope-reorder
# The three run at once (make's jobs; each prints its output whole when it ends): the JAX and
# oneDNN-off sets fill the core that the TensorFlow run's longest groups leave idle at its end.
# With GPU=1 one after the other: each JAX process would claim the GPU's memory.
TEST_SETS := test-tensorflow test-jax test-onednn-off

.PHONY: setup gpu-check test $(TEST_SETS) test-deploy test-install demo study bench clean

setup: $(if $(GPU),gpu-check $(STAMP) $(GPU_STAMP),$(STAMP))

# before anything is installed; make -n shows what would be
gpu-check:
	$(if $(DRY_RUN)$(HAVE_NVIDIA_GPU),,$(error no NVIDIA GPU found (nvidia-smi lists none, \
	no /proc/driver/nvidia/gpus): make setup GPU=1 installs nothing; use make setup))

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(GPU_STAMP): requirements-gpu.txt $(STAMP)
	$(PY) -m pip install --quiet $(foreach p,$(GPU_PACKAGES),'$(p)')
	echo jax > $(VENV)/keras-backend
	touch $(GPU_STAMP)

# Three sets (TEST_SETS, at once): the suite under the backend setup chose (TensorFlow; JAX on
# the GPU with GPU=1), the tests marked jax under JAX (on the CPU, or the GPU with GPU=1), and
# the tests marked decisions with TensorFlow's oneDNN optimisations off: other convolution kernels round
# differently, as another CPU's would, so an assert that holds only by float luck fails here.
test: setup
	@echo "make test: $(TEST_SETS) at once; each prints when it ends"
	@$(MAKE) --no-print-directory -O$(if $(GPU),none,target) -j$(if $(GPU),1,3) $(TEST_SETS)

# One thread per xdist worker: TensorFlow's pools, each sized to the whole machine, only contend
# with the other worker and the other two sets (tests/test_federated_faults.py and
# tests/test_demo.py at -n 2, AMD EPYC AVX-512: 208 -> 185 s of CPU, 130 -> 115 s). The JAX and
# oneDNN-off sets keep the default threads, so federated = one machine also runs multi-threaded.
ONE_THREAD := TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1

test-tensorflow: setup
	$(if $(XDIST),$(ONE_THREAD) )$(PY) -m pytest -q $(XDIST)

test-jax: setup
	$(JAX_TEST_ENV) $(PY) -m pytest -q -m jax

test-onednn-off: setup
	TF_ENABLE_ONEDNN_OPTS=0 $(PY) -m pytest -q -m decisions

# The whole Flower deployment on loopback (SuperLink + SuperNodes, TLS, node auth): ~3 min.
# pip install . into an empty venv (2.2 GB of wheels: minutes), then every installed command's
# --help and a tiny standard -> QC -> inference chain through them.
test-install: setup
	$(PY) -m pytest -q -m install

test-deploy: setup
	$(PY) -m pytest -q -m deploy

demo: setup
	$(PY) -m dqc.demo --out $(DEMO_OUT)

# The demo's scenarios over the untuned cohort seeds (docs/study.md): a benchmark, ~1 h; resumable.
study: setup
	$(PY) -m dqc.study --out $(STUDY_OUT)

bench: setup
	$(PY) -m dqc.bench --out bench_out

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(STUDY_OUT) bench_out .pytest_cache

# README.md's demo figures from the demo's summary.json (python -m dqc.readme); docs-check fails
# when the README quotes a figure that is not the report's.
.PHONY: docs docs-check
docs: setup
	$(PY) -m dqc.readme --summary $(DEMO_OUT)/report/summary.json

docs-check: setup
	$(PY) -m dqc.readme --check --summary $(DEMO_OUT)/report/summary.json
