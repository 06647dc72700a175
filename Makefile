# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the quickstart report on the built-in model (reports-out/quickstart.html)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
# test processes (pytest-xdist), one thread each: the suite is sized for 2 cores
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean chromium postgresql

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints pin torch==2.13.0: the CPU build on this kind of machine's disk, not a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[reports,search,text,gpu,openvino,dev,browser]"
	touch $(STAMP)

# Debian's chromium for the one real-browser test (Playwright's own browser download does not work here)
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the browser test will skip"

# Debian's PostgreSQL for the test of an autotune study shared across machines (the test starts its own server)
postgresql:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
		echo "postgresql could not be installed: the shared-study test will skip"

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench report quickstart -o reports-out/quickstart.ipynb --html reports-out/quickstart.html

test: $(STAMP) chromium postgresql
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/quantization.py
	$(BIN)/python benchmarks/pruning.py
	$(BIN)/python benchmarks/language_model.py

clean:
	rm -rf $(VENV) .workbench .pytest_cache test-artifacts
