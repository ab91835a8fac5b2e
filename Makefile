# The README's two commands: `make serve` and `make test`. Each bootstraps .venv by itself (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test bench venv clean

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

# No model hub is reachable here: everything loads from local checkpoints.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

serve: $(STAMP)
	$(VENV)/bin/mgm serve

test: $(STAMP)
	$(VENV)/bin/ruff check --quiet engine kernels server loadtests tests
	$(PY) -m pytest

# CPU benchmarks run here; GPU sections are re-rendered from the stored results of the GPU check scripts.
bench: $(STAMP)
	$(PY) -m kernels.bench --out BENCHMARKS.md
	$(PY) -m engine.bench_encoder --out BENCHMARKS.md
	$(PY) -m loadtests.engine_throughput --out BENCHMARKS.md
	$(PY) -m kernels.gpu_report --out BENCHMARKS.md

clean:
	rm -rf $(VENV) .cache
