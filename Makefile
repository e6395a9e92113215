# ckptdoctor developer tasks. `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CKPT := $(VENV)/bin/ckptdoctor
DEMO := demo-out
# torch is the user's to bring; here we pin the CPU build that lies on the build machines' disk.
TORCH_PIN ?= torch==2.13.0

# The report tests drive a real headless Chromium: Debian's package, installed when missing.
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup setup-browser demo test test-fast test-scale lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# No skip when Chromium is absent: if it cannot be installed here, `make test` fails loudly.
setup-browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		echo "installing Chromium for the report tests (apt-get install chromium)"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi
	@test -x "$(CHROMIUM)" || { echo "error: $(CHROMIUM) is missing; the report tests need it" >&2; exit 1; }

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
	@echo; echo "$$ ckptdoctor report $(DEMO)/example3_fixed.pth --against examples/seed_models.py:CNNWithWrappedStage -o $(DEMO)/report.html"
	@$(CKPT) report $(DEMO)/example3_fixed.pth --against examples/seed_models.py:CNNWithWrappedStage \
		-o $(DEMO)/report.html
	@echo; echo "$$ ckptdoctor convert $(DEMO)/example3_fixed.pth $(DEMO)/example3_hf/ --verify"
	@$(CKPT) convert $(DEMO)/example3_fixed.pth $(DEMO)/example3_hf/ --verify
	@echo; echo "$$ ckptdoctor inspect $(DEMO)/example3_hf"
	@$(CKPT) inspect $(DEMO)/example3_hf
	@echo; echo "demo finished: the broken checkpoint was diagnosed, repaired, loads strictly and was converted to safetensors."
	@echo "open the picture of the repaired checkpoint: $(abspath $(DEMO))/report.html"

# The whole suite but the 200,000-entry scale tests (minutes each): those run with `make test-scale`.
test: setup setup-browser
	$(PY) -m pytest -q -m "not scale"

test-fast: setup setup-browser
	$(PY) -m pytest -q -m "not slow"

test-scale: setup
	$(PY) -m pytest -q -m scale

lint: setup
	$(VENV)/bin/ruff check ckptdoctor tests examples bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
