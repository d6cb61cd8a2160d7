# The README's two commands: `make demo` and `make test`. Both (re)build .venv from
# requirements.txt first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv clean-runs

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The whole workflow on the offline tiny recipe; each stage resumes or skips finished work.
demo: venv
	$(PY) 01_generate.py --config $(CONFIG)
	$(PY) 02_refine.py --config $(CONFIG)
	$(PY) 03_sft.py --config $(CONFIG)
	$(PY) 04_dpo.py --config $(CONFIG)
	$(PY) 05_eval.py --config $(CONFIG)

test: venv
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf data/runs
