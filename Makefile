# Set-up is part of every target: a fresh Debian machine with Python 3.11 needs nothing else.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mbquant-installed
DATA   := data
OUT    ?= runs/demo

.PHONY: demo test test-unit test-slow bench baselines setup data clean toolchains arm kotlin

setup: $(STAMP)

# pip compiles mbquant's one C module (the histogram count, mbquant/calibrate/_count.c): a C compiler and Python's
# headers must be there (Debian: apt-get install gcc python3.11-dev).
$(STAMP): pyproject.toml setup.py mbquant/calibrate/_count.c
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 2; }
	@command -v cc >/dev/null || { echo "error: no C compiler (cc) to build mbquant/calibrate/_count.c; install one (Debian: apt-get install gcc)"; exit 2; }
	@$(PYTHON) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || \
	  { echo "error: $(PYTHON) has no headers (Python.h) to build mbquant/calibrate/_count.c; install them (Debian: apt-get install python3.11-dev)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e '.[test,plot,onnx]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (installed with apt-get when missing) -> data/{train,val}
data: $(DATA)/train/.complete $(DATA)/val/.complete

$(DATA)/train/.complete $(DATA)/val/.complete: | $(STAMP)
	$(BIN)/mbquant data fashion-mnist $(DATA) --quiet

# The main job on the shipped phone checkpoint with the default (best measured) recipe: 512 calibration
# images from data/train, accuracy drop on all 10,000 data/val images, verified INT8 .pte (and TorchScript
# .pt/.ptl) + report in $(OUT).
DEMO_FLAGS ?= --format pte,torchscript --overwrite --bundle $(OUT)-bundle
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

# The bundle's program on ARM: the C++ runner built against the executorch wheel's runtime for this host and
# cross-built for aarch64 (Debian's g++-aarch64-linux-gnu, the aarch64 executorch wheel from PyPI), run under
# qemu-aarch64-static. Cached in build/; a fresh machine pays ~1 minute (apt + an 18 MB wheel), later runs nothing.
ET_LIB    = $(shell $(BIN)/python -c "import executorch, pathlib; print(pathlib.Path(list(executorch.__path__)[0]))" 2>/dev/null)
RUNNER    := mbquant/mobile/xnnpack/runner/pte_runner.cpp
ARM_WHEEL := build/arm/executorch-1.5.1-cp311-cp311-manylinux_2_28_aarch64.whl
RUNNER_FLAGS = -std=c++17 -O2 -DC10_USING_CUSTOM_GENERATED_MACROS
RUNNER_LIBS  = -Wl,--no-as-needed -lexecutorch -lexecutorch_backend_xnnpack -lexecutorch_kernels_optimized -lexecutorch_threadpool

arm: build/host/pte_runner build/arm/pte_runner

build/host/pte_runner: $(RUNNER) | $(STAMP)
	@mkdir -p build/host
	g++ $(RUNNER_FLAGS) -I$(ET_LIB)/include -I$(ET_LIB)/include/executorch/runtime/core/portable_type/c10 $(RUNNER) \
	  -o $@ -L$(ET_LIB)/lib $(RUNNER_LIBS) -Wl,-rpath,$(ET_LIB)/lib

$(ARM_WHEEL): | $(STAMP)
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null || \
	  (apt-get install -y -qq g++-aarch64-linux-gnu qemu-user-static >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user-static >/dev/null))
	@mkdir -p build/arm
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
	  executorch==1.5.1 -d build/arm

build/arm/et/.unpacked: $(ARM_WHEEL)
	rm -rf build/arm/et && mkdir -p build/arm/et && cd build/arm/et && ../../../$(BIN)/python -m zipfile -e ../$(notdir $(ARM_WHEEL)) .
	touch $@

build/arm/pte_runner: $(RUNNER) build/arm/et/.unpacked
	aarch64-linux-gnu-g++ $(RUNNER_FLAGS) -Ibuild/arm/et/executorch/include \
	  -Ibuild/arm/et/executorch/include/executorch/runtime/core/portable_type/c10 $(RUNNER) -o $@ \
	  -Lbuild/arm/et/executorch/lib $(RUNNER_LIBS) -Wl,-rpath,'$$ORIGIN/et/executorch/lib'

# The Android app's plain-Kotlin classes, compiled with Debian's kotlinc against the platform's org.json (Debian's
# libandroid-json-java, the same API android.jar ships) and run on the JVM by the tests.
KOTLIN_SRC := $(wildcard examples/android/app/src/main/java/org/mbquant/demo/core/*.kt) examples/android/host/HostCheck.kt
ORG_JSON   := /usr/share/java/com.android.json.jar
kotlin: build/kotlin/host-check.jar

build/kotlin/host-check.jar: $(KOTLIN_SRC)
	@command -v kotlinc >/dev/null && command -v java >/dev/null && test -f $(ORG_JSON) || \
	  (apt-get install -y -qq openjdk-17-jdk-headless kotlin libandroid-json-java >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq openjdk-17-jdk-headless kotlin libandroid-json-java >/dev/null))
	@mkdir -p build/kotlin
	kotlinc -cp $(ORG_JSON) $(KOTLIN_SRC) -include-runtime -d $@ 2>&1 | grep -v "^OpenJDK.*deprecated" || true
	@test -f $@

# Every real-data check (Fashion-MNIST, the ARM runners, the Kotlin classes, the Arm toolchain): what CI runs.
test: $(STAMP) data toolchains arm kotlin
	$(BIN)/python -m pytest --durations=15

# The contributors' quick tier: no apt tools and no data download; tiny models on synthetic images (a few minutes).
# Tests that need the real data or a tool are skipped with the reason.
test-unit: $(STAMP)
	MBQUANT_TIER=unit $(BIN)/python -m pytest

test-slow: $(STAMP) data toolchains arm kotlin
	$(BIN)/python -m pytest -m slow

# The benchmark suite: every shipped checkpoint, mbquant against the stock PT2E flow in one run (sizes, latency at
# 1 and 2 threads, Cortex-M flash/RAM, PTQ stage times, peak RSS, calibration throughput) -> benchmarks/results/
# suite.{json,md} and README's table; then the phone checkpoint's plots (per-layer SQNR, accuracy vs calibration
# images, recipes) -> docs/plots; then the recipe wall-time ratio (about 25 minutes on 2 cores so far); the
# real-size table (width 1.0 at 224 px, both orders, growth, trained reference: about 50 minutes); evaluation's
# decode workers (a few minutes); the accuracy table per checkpoint (stock, default, AdaRound, budget, QAT; about
# 40 minutes); what an agreement figure resolves (the float model under sub-pixel input shifts; 4 minutes).
bench: $(STAMP) data
	$(BIN)/python benchmarks/suite.py --readme
	$(BIN)/mbquant ptq mobilenet_v2 --calib $(DATA)/train --eval $(DATA)/val --overwrite --quiet --out runs/bench-phone
	$(BIN)/mbquant report runs/bench-phone --calibration-sweep default --recipes default --plot --plot-dir docs/plots --quiet
	cp runs/bench-phone/calibration_sweep.json runs/bench-phone/recipes.json benchmarks/results/
	$(BIN)/python benchmarks/recipe_walltime.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/decode_workers.py
	$(BIN)/python benchmarks/checkpoints.py --readme
	$(BIN)/python benchmarks/agreement_jitter.py

# Re-measure mbquant's own accuracy baselines (tests/baselines/*.json) and their tolerances; nothing else writes them.
baselines: $(STAMP) data
	$(BIN)/python -m tests.baselines.record

clean:
	rm -rf $(VENV) runs build *.egg-info
