PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

# Create or update .venv whenever pyproject.toml changes (torch comes from PyPI as usual).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-regtools demo --output-dir outputs

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/weight_selection.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
