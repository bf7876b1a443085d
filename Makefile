# The two commands of the README, plus helpers. Everything a fresh machine needs is installed here.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
MAX_JOBS ?= 2
export MAX_JOBS

# Debian's Fashion-MNIST package, when apt is there (else the demo says it fell back to digits).
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: deps extras build data demo test test-fast bench cpp-test clean

deps:
	$(PIP) install --quiet torch ninja numpy scikit-learn tqdm matplotlib pytest pytest-benchmark setuptools wheel

# The optional extras (pyproject's [hf]): the model and data libraries users bring. `make test` installs them so
# that CI runs the tests of torchvision, timm and transformers models and `datasets` data; the package imports
# them lazily, and their tests skip with a reason where they are absent.
EXTRAS := torchvision timm transformers datasets rouge-score concept-erasure
extras: deps
	$(PIP) install --quiet $(EXTRAS)

# Installs (editable, --no-build-isolation: against the torch installed above) and compiles only when
# csrc/**, setup.py, CMakeLists.txt, the interpreter, the torch version or a build switch changed
# (stamp: build/.dfmu-build-stamp; see the script). FORCE_REBUILD=1 make build always compiles.
build: deps
	PYTHON="$(PYTHON)" PIP="$(PIP)" bash scripts/build-if-changed.sh
	$(PYTHON) -c "import dfmu_ext, json; print(json.dumps(dfmu_ext.build_info()))"

data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	fi

# The classifier demo, then the language-model one (a causal LM forgets people; needs transformers).
demo: extras build data
	$(PYTHON) -m dfmu_ext demo
	$(PYTHON) -m dfmu_ext demo --task lm --out-dir runs/demo-lm

test: extras build data
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
	$(MAKE) cpp-test

# Without the tests marked slow (subprocess and torchrun runs, the README/docs blocks, anything over ~20 s),
# against what is already installed and built; `make test` runs them all.
test-fast:
	$(PYTHON) -m pytest -q -x -p no:cacheprovider -m "not slow" tests

bench: build
	$(PYTHON) -m pytest -q -p no:cacheprovider benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name

cpp-test:
	@command -v cmake >/dev/null 2>&1 || $(PIP) install --quiet cmake
	@if [ -f CMakeLists.txt ]; then \
		cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch;print(torch.utils.cmake_prefix_path)')" >/dev/null && \
		cmake --build build/cmake -j $(MAX_JOBS) && ctest --test-dir build/cmake --output-on-failure; \
	fi

clean:
	rm -rf build dist *.egg-info dfmu_ext/_C*.so dfmu_ext/_build_config.py
