# Every target installs what it needs and is safe to run again.
PYTHON   ?= python3
VENV     := .venv
GCAPI_VENV := .venv-gcapi
BIN      := $(VENV)/bin
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc attr systemd

.PHONY: all setup system-deps demo test lint bench clean

all: setup

# System packages: installed only when missing (apt-get as root, else sudo).
system-deps:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstalled when pyproject.toml changes. The demo extra: the fake services (demo and tests).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo,test]'
	touch $@

# The official Grand Challenge client pins httpx 0.23, so it lives in a venv of its own.
$(GCAPI_VENV)/.installed:
	$(PYTHON) -m venv $(GCAPI_VENV)
	$(GCAPI_VENV)/bin/python -m pip install -q 'gcapi==0.16.1'
	touch $@

setup: system-deps $(VENV)/.installed $(GCAPI_VENV)/.installed

demo: setup
	$(BIN)/fsmount demo

lint: setup
	$(BIN)/ruff check fsmount tests $(wildcard bench)
	$(BIN)/ruff format --check fsmount tests $(wildcard bench)

test: setup
	$(BIN)/ruff check fsmount tests $(wildcard bench)
	GCAPI_PYTHON=$(CURDIR)/$(GCAPI_VENV)/bin/python $(BIN)/python -m pytest tests

# rclone is the peer the benchmark compares against (Debian's package).
bench: setup
	@dpkg -s rclone >/dev/null 2>&1 || { SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq rclone; }
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(GCAPI_VENV) build *.egg-info
