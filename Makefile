# The README's two commands: `make bench` and `make test`. On a fresh machine each creates .venv, installs
# torch and the tools, builds fusedaccum from source (editable, in place) and runs.
#
# Options: TORCH_VERSION (default 2.14.1, a CUDA build: the CUDA kernels compile even without a GPU),
# FUSEDACCUM_BUILD_CUDA=auto|1|0, MAX_JOBS, TORCH_CUDA_ARCH_LIST (see setup.py).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
CPU_TORCH_VERSION ?= 2.13.0
CPU_VENV ?= .venv-cputorch
OLDEST_TORCH_VERSION ?= 2.11.0
OLDEST_VENV ?= .venv-oldest
# setuptools>=77 reads pyproject's SPDX license field; a fresh venv brings an older one that pip would keep.
TOOLS = ninja pybind11 pytest hypothesis numpy matplotlib tqdm packaging 'setuptools>=77' wheel
# The frameworks fusedaccum.integrations serves; the tests run each for real (the package does not need them).
INTEGRATIONS = transformers accelerate lightning

export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build test test-slow bench check-cpu-torch check-oldest-torch check-cuda-emulated lint clean

all: test

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) $(TOOLS) $(INTEGRATIONS)
	touch $@

build: $(VENV)/.installed
	@echo "building fusedaccum (log: $(VENV)/build.log)"
	@$(VENV)/bin/python -m pip install --no-build-isolation --no-deps -v -e . > $(VENV)/build.log 2>&1 \
		|| { tail -40 $(VENV)/build.log; exit 1; }
	@grep -h "fusedaccum setup" $(VENV)/build.log | sort -u || true
	@$(VENV)/bin/python -m fusedaccum.info

test: build
	$(VENV)/bin/pytest

test-slow: build
	HYPOTHESIS_PROFILE=large $(VENV)/bin/pytest tests/test_ops.py -k property
	HYPOTHESIS_PROFILE=large $(VENV)/bin/pytest tests/test_stateful.py

bench: build
	$(VENV)/bin/python -m benchmarks

# The CPU-only-torch path: a second venv with a CPU build of torch, a normal (non-editable) install from a
# copy of the tree, and the op tests against it. Also checks that FUSEDACCUM_BUILD_CUDA=1 refuses at once.
check-cpu-torch:
	@test -x $(CPU_VENV)/bin/python || $(PYTHON) -m venv $(CPU_VENV)
	$(CPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CPU_VENV)/bin/python -m pip install --quiet torch==$(CPU_TORCH_VERSION) pytest hypothesis 'setuptools>=77' wheel ninja
	$(call copy_tree,$(CPU_VENV))
	@cd $(CPU_VENV)/src && if FUSEDACCUM_BUILD_CUDA=1 ../bin/python setup.py --version > ../refusal.log 2>&1; then \
		echo "FUSEDACCUM_BUILD_CUDA=1 with a CPU-only torch should have failed"; exit 1; fi; \
		tail -1 ../refusal.log
	cd $(CPU_VENV)/src && FUSEDACCUM_BUILD_CUDA=auto ../bin/python -m pip install --no-build-isolation --no-deps -v . \
		> ../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	@grep -h "fusedaccum setup" $(CPU_VENV)/build.log | sort -u
	@# info from outside src/: `python -m` puts the working directory first on sys.path (the unbuilt copy)
	cd $(CPU_VENV) && bin/python -m fusedaccum.info
	cd $(CPU_VENV)/src && ../bin/pytest tests/test_ops.py

# The oldest torch and triton supported (2.11.0 + 3.6.0, what the GPU machine has): the whole suite, built with
# FUSEDACCUM_BUILD_CUDA as set (CI: 1, so the CUDA sources compile against 2.11's headers too), from a copy of
# the tree installed editable there, so spawned workers and subprocesses import the built copy.
check-oldest-torch:
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet torch==$(OLDEST_TORCH_VERSION) $(TOOLS) $(INTEGRATIONS)
	$(call copy_tree,$(OLDEST_VENV))
	cd $(OLDEST_VENV)/src && ../bin/python -m pip install --no-build-isolation --no-deps -v -e . > ../build.log 2>&1 \
		|| { tail -40 ../build.log; exit 1; }
	@grep -h "fusedaccum setup" $(OLDEST_VENV)/build.log | sort -u
	cd $(OLDEST_VENV)/src && ../bin/python -m fusedaccum.info
	cd $(OLDEST_VENV)/src && ../bin/pytest

# The CUDA kernel on the CPU under the SIMT emulation of tests/simt, with ThreadSanitizer (64 threads per block)
# and with AddressSanitizer + UBSan, then the mutation check: classic bugs injected into a copy of the kernel must
# each fail the emulated suite (tests/simt/check.py says which check caught each). 4-8 minutes on 2 cores.
check-cuda-emulated: build
	$(VENV)/bin/python tests/simt/check.py --pytest

# A copy of the tracked and untracked-but-not-ignored files in $(1)/src.
define copy_tree
	@rm -rf $(1)/src && mkdir -p $(1)/src
	@git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(1)/src
endef

lint:
	$(VENV)/bin/python -m pip install --quiet ruff
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info fusedaccum/_C*.so fusedaccum/_build_info.py
