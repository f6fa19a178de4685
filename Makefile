# Entry points: `make demo` and `make test` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOC := $(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/leader.proto protos/learner.proto
GENERATED := protos/leader_pb2.py protos/leader_pb2.pyi protos/leader_pb2_grpc.py protos/learner_pb2.py protos/learner_pb2.pyi protos/learner_pb2_grpc.py
# torch and torchvision come from PyPI, whose Linux torch brings CUDA's libraries (an environment of about 6 GB).
# Another index for those two, e.g. PyTorch's CPU wheels (without CUDA), on a fresh clone or after make clean:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PINS := $(shell grep -oE '^(torch|torchvision)==[^ #]+' requirements.txt)

.PHONY: install proto demo test test-fast test-long ray test-ray lint bench bench-full certs docs clean

install: $(STAMP) $(GENERATED)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

proto: $(STAMP)
	$(PROTOC)

$(GENERATED) &: protos/leader.proto protos/learner.proto | $(STAMP)
	$(PROTOC)

demo: install
	$(PY) launch.py --demo

# Tiers are folders of tests/ (unit, service, e2e), marked by tests/conftest.py; pyproject.toml configures pytest.
# Unit and service tests run on two workers (pytest-xdist: each test owns its ports and files), end-to-end tests one
# at a time (their processes share the cores, and their deadlines assume they have them).
test: install
	$(PY) -m pytest -q -n 2 -m "(unit or service) and not long and not ray"
	$(PY) -m pytest -q -m "e2e and not long and not ray"

test-fast: install
	$(PY) -m pytest -q -n 2 -m "(unit or service) and not long and not ray"

test-long: install
	$(PY) -m pytest -q -m "long and not ray"

# Ray, the optional extra of launch.py --ray (requirements-ray.txt), and the tests marked ray: a Ray cluster of
# network-namespace hosts made and removed by the tests (they need root; they skip, saying why, where they cannot).
ray: install
	$(PY) -m pip install --quiet -r requirements-ray.txt

test-ray: ray
	$(PY) -m pytest -q -m ray

# ruff (lint, and the format check) and mypy, as pyproject.toml configures them; no findings is the bar.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# bench: the headline figures (under 10 minutes on 2 cores); bench-full: every figure (over an hour).
# Both write bench/results.json; python bench.py --list names the figures.
bench: install
	$(PY) bench.py --headline

bench-full: install
	$(PY) bench.py

certs:
	bash federated/tools/certs.sh certs $(SANS)

# The documentation site (mkdocs.yml, docs/) into site/; any warning, such as a broken link, fails it.
# (NO_MKDOCS_2_WARNING: no banner about the Material theme's end of life in 2027 at every build.)
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	find . -name __pycache__ -not -path "./.venv/*" -prune -exec rm -rf {} +
	rm -rf $(VENV) $(GENERATED) certs .pytest_cache .hypothesis .mypy_cache .ruff_cache site
