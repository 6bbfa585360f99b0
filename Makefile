# Set-up is part of every target: a fresh Debian machine with Python 3.11 needs nothing else.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mbquant-installed
DATA   := data
OUT    ?= runs/demo

.PHONY: demo test test-slow bench setup data clean toolchains

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (installed with apt-get when missing) -> data/{train,val}
data: $(DATA)/train/.complete $(DATA)/val/.complete

$(DATA)/train/.complete $(DATA)/val/.complete: | $(STAMP)
	$(BIN)/mbquant data fashion-mnist $(DATA) --quiet

# The main job on the shipped phone checkpoint with the default (best measured) recipe: 512 calibration
# images from data/train, accuracy drop on all 10,000 data/val images, verified INT8 .pte (and TorchScript
# .pt/.ptl) + report in $(OUT).
DEMO_FLAGS ?= --format pte,torchscript --overwrite
demo: $(STAMP) data
	$(BIN)/mbquant ptq mobilenet_v2 --calib $(DATA)/train --eval $(DATA)/val $(DEMO_FLAGS) --out $(OUT)

# The Arm GNU toolchain (Debian's gcc-arm-none-eabi) syntax-checks the Cortex-M firmware header and sketch.
toolchains:
	@command -v arm-none-eabi-g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib >/dev/null 2>&1 || \
	     { apt-get update -qq && apt-get install -y -qq gcc-arm-none-eabi libnewlib-arm-none-eabi \
	       libstdc++-arm-none-eabi-newlib >/dev/null; }); \
	  else echo "note: arm-none-eabi-g++ missing and not installable here; the firmware syntax checks will be skipped"; fi; }

test: $(STAMP) data toolchains
	$(BIN)/python -m pytest

test-slow: $(STAMP) data toolchains
	$(BIN)/python -m pytest -m slow

bench: $(STAMP) data
	$(BIN)/python benchmarks/recipe_walltime.py
	$(BIN)/python benchmarks/ptq_accuracy.py

clean:
	rm -rf $(VENV) runs build *.egg-info
