# Entry points: `make demo` and `make test` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOC := $(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/leader.proto protos/learner.proto
GENERATED := protos/leader_pb2.py protos/leader_pb2_grpc.py protos/learner_pb2.py protos/learner_pb2_grpc.py

.PHONY: install proto demo test test-fast test-long bench certs clean

install: $(STAMP) $(GENERATED)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

proto: $(STAMP)
	$(PROTOC)

$(GENERATED) &: protos/leader.proto protos/learner.proto | $(STAMP)
	$(PROTOC)

demo: install
	$(PY) launch.py --demo

# Tiers are folders of tests/ (unit, service, e2e), marked by tests/conftest.py; pyproject.toml configures pytest.
test: install
	$(PY) -m pytest -q -m "not long"

test-fast: install
	$(PY) -m pytest -q -m "(unit or service) and not long"

test-long: install
	$(PY) -m pytest -q -m long

bench: install
	$(PY) bench.py

certs:
	bash federated/tools/certs.sh certs $(SANS)

clean:
	find . -name __pycache__ -not -path "./.venv/*" -prune -exec rm -rf {} +
	rm -rf $(VENV) $(GENERATED) certs .pytest_cache .hypothesis .mypy_cache .ruff_cache site
