# The README's two commands: `make serve` and `make test`. Each bootstraps .venv by itself (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test bench bench-serving venv browser node-sdk redis clean

venv: $(STAMP)

# Re-runs only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	echo "installing .[$$extra,dev] into $(VENV)"; \
	$(PY) -m pip install --quiet --upgrade pip && \
	$(PY) -m pip install --quiet -e ".[$$extra,dev]" && \
	if [ "$$extra" = cpu ]; then \
	  : "PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch and fail to load beside"; \
	  : "torch 2.13.0+cpu ('operator torchvision::nms does not exist'); transformers/vLLM work without them."; \
	  $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	@touch $(STAMP)

# The playground's browser tests drive Debian's Chromium (Playwright's own browser downloads are never used).
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	echo "installing Debian's chromium (browser tests)"; \
	$$sudo apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core

# The shared image store's tests run a real Redis: Debian's redis-server (the fixture starts and stops its own).
REDIS := /usr/bin/redis-server
redis: $(REDIS)

$(REDIS):
	@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	echo "installing Debian's redis-server (image store tests)"; \
	$$sudo apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends redis-server

# The official OpenAI Node SDK for the SDK tests (tests/node/package.json pins it; package-lock.json records it).
NODE_SDK := tests/node/node_modules/.package-lock.json
node-sdk: $(NODE_SDK)

$(NODE_SDK): tests/node/package.json tests/node/package-lock.json
	@echo "installing the openai npm package (tests/node)"
	@cd tests/node && npm ci --no-audit --no-fund --silent

# No model hub is reachable here: everything loads from local checkpoints.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

serve: $(STAMP)
	$(VENV)/bin/mgm serve

test: $(STAMP) $(CHROMIUM) $(NODE_SDK) $(REDIS)
	$(VENV)/bin/ruff check --quiet engine kernels server loadtests bench tests deploy
	MGM_REQUIRE_BROWSER=1 MGM_REQUIRE_NODE=1 MGM_REQUIRE_REDIS=1 $(PY) -m pytest

# CPU benchmarks run here (results in bench/results/); the GPU sections are re-rendered from the stored results
# of `bash bench/gpu_check.sh OUT` (see bench/__init__.py).
bench: $(STAMP)
	$(PY) -m bench.kernels_cpu --out BENCHMARKS.md
	$(PY) -m bench.encoder --out BENCHMARKS.md
	$(PY) -m bench.serving --out BENCHMARKS.md
	$(PY) -m bench.images_cpu --out BENCHMARKS.md
	$(PY) -m bench.affinity --out BENCHMARKS.md
	$(PY) -m bench.report --out BENCHMARKS.md
	$(PY) -m bench.gateway_memory --out RELIABILITY.md

# The serving benchmarks alone (~10 min on 2 cores): our stack against the official serving path, SDXL pool, HD.
bench-serving: $(STAMP)
	$(PY) -m bench.serving --out BENCHMARKS.md

# Opt-in soak test (not part of `make test`): the whole stack under mixed traffic; SOAK_SECONDS (default 180, at
# most 600). Writes its figures into RELIABILITY.md.
.PHONY: soak
soak: $(STAMP)
	$(PY) tests/server/gateway/reliability/reliability_soak.py --seconds $(or $(SOAK_SECONDS),180)

clean:
	rm -rf $(VENV) .cache
