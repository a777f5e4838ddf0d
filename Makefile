# mlxgate: two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test bench clean system-deps

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

# OpenBLAS makes CPU matmuls ~50x faster (SPEC §1); tmux drives the dashboard test.
# Best effort: without apt (or root) mlxgate still works and warns once.
system-deps:
	@if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then \
	  need=""; \
	  ls /usr/lib/*-linux-gnu/libopenblas.so.0 >/dev/null 2>&1 || need="$$need libopenblas0-pthread"; \
	  command -v tmux >/dev/null 2>&1 || need="$$need tmux"; \
	  ls /usr/bin/clang++* >/dev/null 2>&1 || need="$$need clang"; \
	  if [ -n "$$need" ]; then \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$need) >/dev/null 2>&1 \
	      || echo "note: could not apt-get install$$need; continuing (slower CPU matmuls; dashboard and Metal address-space tests skipped)"; \
	  fi; \
	fi

demo: install
	$(BIN)/mlxgate info
	$(BIN)/mlxgate models fetch smollm2-135m-instruct
	$(BIN)/mlxgate measure --model smollm2-135m-instruct --max-tokens 48

# pytest's exit 5 (no tests collected) is passed on as 5 for .ci/run to judge.
test: install
	@echo '$(BIN)/python -m pytest $(PYTEST_ARGS)'
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo 'pytest: no tests collected'; exit $$rc

bench: install
	$(BIN)/python bench/measure.py
	$(BIN)/python bench/kernels.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache bench/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
