# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs the pinned dependencies the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cnnlab study configs/demo.yaml

# lint-imports first: the layers and the no-cycles contracts of [tool.importlinter] in pyproject.toml
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Debian's Chromium and ChromeDriver for the page test in tests/test_serve.py: skipped without them,
# except under CI (CI=true), where that test fails without them and so does this target
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  why=; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
	    why="could not install chromium and chromium-driver with apt-get"; \
	    if [ -z "$$why" ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then \
	      why="apt-get installed chromium and chromium-driver, but they are not on PATH"; fi; \
	  else why="chromium and chromium-driver are not installed (installing them needs root and apt-get)"; fi; \
	  if [ -n "$$why" ]; then \
	    case "$$CI" in \
	      [Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]) echo "error: $$why; under CI the browser test needs them" >&2; exit 1;; \
	      *) echo "note: $$why; the browser test will be skipped";; \
	    esac; \
	  fi; \
	fi

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/transfer.py engines
	$(BIN)/python benchmarks/transfer.py hymenoptera
	$(BIN)/python benchmarks/transfer.py cifar10
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) runs studies comparison .pytest_cache tests/artifacts
