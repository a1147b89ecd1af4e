# The two commands of the README: `make run` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch (a local file on the dev/CI machines); the CUDA torch 2.13 wheel pins triton 3.7.1.
TORCH_PINS ?= torch==2.13.0 triton==3.7.1

.PHONY: setup model run test lint clean deb test-install

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

model: setup
	$(BIN)/llm-appliance model fetch

run: model
	$(BIN)/llm-appliance serve --model default

test: model
	$(BIN)/pytest -q -ra tests

# ruff, then the layering contracts of docs/ARCHITECTURE.md (import-linter, pyproject.toml).
lint: setup
	$(BIN)/ruff check appliance kernels bench tests
	$(BIN)/lint-imports

# The .debs (app, CPU and CUDA runtimes, model) for bookworm and trixie into dist/<suite>/, each a
# flat apt repository. The CUDA runtime downloads ~2.6 GB of wheels from PyPI (cached in .cache/deb).
DEB_SUITES ?= bookworm trixie
deb: model
	bash packaging/build-deb.sh $(foreach s,$(DEB_SUITES),--suite $(s))

# CI's part (as root): app + CPU runtime + model for bookworm, installed and driven in a booted
# container (packaging/test-install; the debootstrap base is cached in .cache/debootstrap).
test-install: model
	LINTIAN=app,model-smollm2 bash packaging/build-deb.sh --suite bookworm app runtime-cpu model
	bash packaging/test-install --suite bookworm

clean:
	rm -rf $(VENV) build dist *.egg-info
