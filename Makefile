# ckptdoctor developer tasks. `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CKPT := $(VENV)/bin/ckptdoctor
DEMO := demo-out
# torch is the user's to bring; here we pin the CPU build that lies on the build machines' disk.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	rm -rf $(DEMO)
	@$(PY) examples/demo.py $(DEMO)
	@echo; echo "$$ ckptdoctor inspect $(DEMO)/example1.pth --keys"
	@$(CKPT) inspect $(DEMO)/example1.pth --keys
	@echo; echo "$$ ckptdoctor inspect $(DEMO)/example2.pth"
	@$(CKPT) inspect $(DEMO)/example2.pth
	@echo; echo "$$ ckptdoctor inspect $(DEMO)/example3_dataparallel.pth"
	@$(CKPT) inspect $(DEMO)/example3_dataparallel.pth
	@echo; echo "$$ ckptdoctor check $(DEMO)/example3_dataparallel.pth --against examples/seed_models.py:CNNWithWrappedStage"
	@$(CKPT) check $(DEMO)/example3_dataparallel.pth --against examples/seed_models.py:CNNWithWrappedStage; \
		test $$? -eq 1
	@echo; echo "$$ ckptdoctor fix $(DEMO)/example3_dataparallel.pth --against examples/seed_models.py:CNNWithWrappedStage -o $(DEMO)/example3_fixed.pth"
	@$(CKPT) fix $(DEMO)/example3_dataparallel.pth --against examples/seed_models.py:CNNWithWrappedStage \
		-o $(DEMO)/example3_fixed.pth
	@echo; echo "$$ ckptdoctor check $(DEMO)/example3_fixed.pth --against examples/seed_models.py:CNNWithWrappedStage"
	@$(CKPT) check $(DEMO)/example3_fixed.pth --against examples/seed_models.py:CNNWithWrappedStage
	@echo; echo "$$ ckptdoctor convert $(DEMO)/example3_fixed.pth $(DEMO)/example3_hf/ --verify"
	@$(CKPT) convert $(DEMO)/example3_fixed.pth $(DEMO)/example3_hf/ --verify
	@echo; echo "$$ ckptdoctor inspect $(DEMO)/example3_hf"
	@$(CKPT) inspect $(DEMO)/example3_hf
	@echo; echo "demo finished: the broken checkpoint was diagnosed, repaired, loads strictly and was converted to safetensors."

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check ckptdoctor tests examples bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
