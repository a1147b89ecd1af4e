# The two commands of the README: `make run` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch (a local file on the dev/CI machines); the CUDA torch 2.13 wheel pins triton 3.7.1.
TORCH_PINS ?= torch==2.13.0 triton==3.7.1

.PHONY: setup model run test lint clean deb

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

deb:
	bash packaging/build-deb.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
