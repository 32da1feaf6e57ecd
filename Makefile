# Targets: install, demo, serve, test, test-fast, lint, bench, proto, dashboards, ansible-test
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
SILERO_VAD := silero-vad==6.2.3

.PHONY: install demo serve test test-fast lint bench proto dashboards ansible-test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the cloud SDKs too: their adapters are tested against local services
	$(PY) -m pip install -q -e '.[dev,multilingual,azure,google]'
	# silero-vad declares torch as a dependency but the sidecar only reads
	# its ONNX model with onnxruntime: install it without dependencies
	$(PY) -m pip install -q --no-deps $(SILERO_VAD)
	touch $@

demo: install
	$(PY) -m sidecar demo

serve: install
	$(PY) -m sidecar serve

test: install
	$(PY) -m pytest -q -ra -m "not ansible"

# the Ansible role against a stock Jitsi layout on this machine (minutes)
ansible-test: install
	$(PY) -m pytest -q -ra -m ansible tests/test_ansible.py

test-fast: install
	$(PY) -m pytest -q -m "not slow and not ansible"

lint: install
	$(VENV)/bin/ruff check sidecar tests bench dashboards
	$(VENV)/bin/ruff format --check sidecar tests bench dashboards
	$(PY) dashboards/generate.py --check
	$(VENV)/bin/mypy
	cd prosody-module && luacheck .
	cd tests/standins && luacheck --config ../../prosody-module/.luacheckrc .

bench: install
	$(PY) bench/conference.py --out docs/benchmarks.md
	$(PY) bench/run.py --out docs/benchmarks.md

# Grafana dashboards and Prometheus alert rules, from dashboards/generate.py
dashboards: install
	$(PY) dashboards/generate.py

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
