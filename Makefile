# Targets: install, demo, serve, test, test-fast, test-prosody13, lint, bench, bench-delivery, proto, dashboards, ansible-test, fuzz
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
SILERO_VAD := silero-vad==6.2.3

.PHONY: install demo serve test test-fast test-prosody13 lint bench bench-delivery proto dashboards ansible-test fuzz clean

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

# The tests that run a real Prosody (every test file importing tests.prosody
# or tests.test_prosody_module, and the codec's Prosody test), again on
# Prosody 13 from bookworm-backports, unpacked next to the system's 0.12 by
# scripts/prosody13.sh (needs root or sudo the first time, for apt).
PROSODY13_TESTS ?= $(filter-out tests/test_lua_codec.py,$(shell grep -lE '^from tests\.(prosody|test_prosody_module) import' tests/test_*.py)) \
	tests/test_lua_codec.py::test_real_prosody_module_require_and_net_http

test-prosody13: install
	@set -e; vars="$$(bash scripts/prosody13.sh)"; \
	echo "$$vars"; \
	env $$vars PROSODY_EXPECT_VERSION=13. $(PY) -m pytest -q -ra -m "not ansible" $(PROSODY13_TESTS)

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

# the same speech as Jigasi, 0.2/1/2 s chunks and jittered bursts deliver it:
# in process, then through the Jigasi endpoint of a sidecar of its own
# (bench/jigasi.py --url ws://HOST/streaming-whisper/ws --token T for any other)
bench-delivery: install
	$(PY) bench/delivery.py
	$(PY) bench/jigasi.py --spawn --all

# Grafana dashboards and Prometheus alert rules, from dashboards/generate.py
dashboards: install
	$(PY) dashboards/generate.py
# the fuzzers of tests/test_fuzz.py at length, new random inputs each run;
# figures to docs/fuzz-figures.json (make test runs 60 fixed inputs each)
FUZZ_EXAMPLES ?= 20000
fuzz: install
	rm -f docs/fuzz-figures.json
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 FUZZ_REPORT=docs/fuzz-figures.json \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
