# The README's two commands are `make demo` and `make test`. Both (re)build .venv from
# requirements.txt first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
STAGES := 01_generate 02_refine 03_sft 04_dpo 05_eval
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test reproduce venv clean-runs

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The tiny recipe and the tests never touch the Hub.
demo test: export HF_HUB_OFFLINE = 1

# All five stages on the offline tiny recipe (a few minutes on a laptop CPU). Rerunning resumes.
demo: venv
	@for s in $(STAGES); do echo "== $$s"; $(PY) $$s.py --config $(CONFIG) || exit 1; done
	@run=$$($(PY) -c "from safecot.config import load_recipe as r; c = r('$(CONFIG)'); print(f\"{c['runs_dir']}/{c['run_name']}\")"); \
	echo "Outputs:  $$run/  (one folder per stage, each with manifest.json)"; \
	echo "Report:   $$run/05_eval/report.md"; \
	echo "Figures:  $$run/05_eval/intervals.png, and notebooks/*.ipynb draw every stage (RUN_DIR=$$run)"

# A recipe stage by stage; a recipe with an `experiment:` section runs every arm of its paper's
# table and writes 05_eval/paper_table.md (safecot/experiments.py). Finished stages change nothing,
# an interrupted one resumes. e.g. make reproduce CONFIG=configs/aidsafe-qwen2.5-7b.yaml
reproduce: venv
	$(PY) -m safecot.experiments $(CONFIG)

test: venv
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf data/runs
