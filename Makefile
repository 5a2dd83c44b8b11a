# gmfx: one command installs and runs the example pipeline, one installs and runs the tests.
#   make demo    # set-up + the whole pipeline on the bundled example dataset
#   make test    # set-up + the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test benchmarks clean

$(BIN)/.gmfx-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: this CPU build satisfies gmfx's torch requirement, so pip never resolves
	# the default (CUDA) wheels. On a GPU machine install a CUDA build of the same version instead.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the Dask operator's CRD schemas for the manifest tests: files only, so without its Kubernetes client stack
	$(BIN)/python -m pip install --quiet --no-deps "dask-kubernetes>=2026.3"
	touch $@

install: $(BIN)/.gmfx-installed

demo: install
	$(BIN)/gmfx example gmfx-example
	$(BIN)/gmfx run gmfx-example

test: install
	$(BIN)/python -m pytest -q

# every benchmark at its default sizes (each writes benchmarks/results/<name>.json), then the capacity
# projection from their figures, then one markdown table of all of them (benchmarks/results/TABLE.md)
BENCHMARKS = $(filter-out benchmarks/capacity.py,$(sort $(wildcard benchmarks/[a-z]*.py)))
benchmarks: install
	for b in $(BENCHMARKS); do $(BIN)/python $$b || exit 1; done
	$(BIN)/python benchmarks/capacity.py
	$(BIN)/python benchmarks/_table.py | tee benchmarks/results/TABLE.md

clean:
	rm -rf $(VENV) gmfx-example .pytest_cache .hypothesis
