# Two commands do all set-up on a fresh machine:
#   make demo   - install, fetch SmolLM2 (pinned sha256), run the end-to-end demo (cloud + 2 edges on loopback)
#   make test   - install, fetch SmolLM2, run the whole test suite (slow real-model tests included)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install model demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build here: an unpinned torch pulls several GB of CUDA wheels
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

model: install
	$(BIN)/tandem models fetch

demo: model
	$(BIN)/tandem demo

# docker-compose (Debian's) validates docker-compose.yml in the tests; installed when we are root and it is missing
test: model
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1; } || true
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: model
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
