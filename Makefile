# The two commands of the README. Each does all of its own set-up on a fresh machine (idempotent, fast when done).
#   make train   — runs the main notebook with papermill on the embedded CPU default
#   make test    — nbdev_test over every notebook + pytest tests/ + export/clean leave the tree unchanged
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# nbdev_test's skip pattern: scratch notebooks (its default) and the papermill entry points that tests/ execute
PAPERMILL_ENTRY_POINTS := ^[_.]|^(train|dpo|experiment)\.ipynb$$
# The main job's notebook and where its executed copy goes.
TRAIN_NB ?= nbs/train.ipynb
OUT ?= runs/train-out.ipynb
# No model weights are ever fetched at run time: a stray download fails fast instead of hanging.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

# Install Debian packages $(2) when command $(1) is missing and we are root (else say how)
define apt_if_missing
command -v $(1) >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else echo "warning: $(1) not found; install it with: apt-get install $(2)"; fi; }
endef

.PHONY: setup train test gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	@$(call apt_if_missing,tesseract,tesseract-ocr tesseract-ocr-eng)
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel and never resolves a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

train: setup
	@mkdir -p $(dir $(OUT))
	$(BIN)/papermill $(TRAIN_NB) $(OUT) -k python3 $(PARAMS)
	@echo "main job done: executed notebook at $(OUT)"

test: setup
	@$(call apt_if_missing,chromium,chromium)   # for the JupyterLab browser test
	@echo "nbdev_test: $$(cd nbs && ls *.ipynb | grep -vcE '$(PAPERMILL_ENTRY_POINTS)') notebooks (the papermill entry points run in tests/)"
# two notebooks at once on two cores, one thread each: torch's default of one thread per core makes two processes' threads
# spin against each other (run_lab measured 2.6x slower with 2 threads than with 1 beside other busy processes)
# The papermill entry points (train, dpo, experiment) are executed by tests/ with papermill, as users run them, and their
# outputs checked there: nbdev_test skips them rather than run them a second time.
	OMP_NUM_THREADS=1 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_test --n_workers 2 --do_print --timing --skip_file_re '$(PAPERMILL_ENTRY_POINTS)'
# pytest on both cores (pytest-xdist, one thread per worker); the browser test (marked slow: a JupyterLab server, a kernel
# and Chromium) runs alone afterwards, where its page timeouts do not depend on what the other worker is doing
	OMP_NUM_THREADS=1 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q -n 2 -m "not slow" tests/
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q -m slow tests/
	@before=$$(git diff -- nbs apex_nb; git status --porcelain -- nbs apex_nb); \
	  PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_export && PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_clean; \
	  after=$$(git diff -- nbs apex_nb; git status --porcelain -- nbs apex_nb); \
	  if [ "$$before" != "$$after" ]; then git status --short -- nbs apex_nb; \
	    echo "nbdev_export/nbdev_clean changed the tree: the notebooks and apex_nb/ were out of sync or not clean; commit the result"; exit 1; fi
	@echo "export and clean leave the tree unchanged"

# On a CUDA machine: the SD3.5 twins on the GPU (≈ 1 min), then 2 steps of `sd35m-1gpu` on real SD3.5-M if its weights are here
# (flags through GPU_CHECK_ARGS, e.g. GPU_CHECK_ARGS="--model /data/sd35m"). Without a GPU it says so and exits 0.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
