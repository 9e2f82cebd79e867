PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The oldest supported stack (pins in constraints/oldest.txt), installed beside .venv and put in front of it with
# PYTHONPATH: its packages shadow the newer ones in .venv, everything else (torch included) comes from .venv.
OLDEST := $(CURDIR)/.compat/oldest
OLDEST_STAMP := $(OLDEST)/.installed-stamp

.PHONY: demo test test-oldest bench clean

# Create or update .venv whenever pyproject.toml changes (torch comes from PyPI as usual).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Reinstalled whenever the pins or .venv change; `pip check` fails if the two no longer fit together.
$(OLDEST_STAMP): constraints/oldest.txt $(STAMP)
	rm -rf $(OLDEST)
	$(BIN)/python -m pip install -q --no-deps --target $(OLDEST) -r constraints/oldest.txt
	PYTHONPATH=$(OLDEST) $(BIN)/python -m pip check
	touch $(OLDEST_STAMP)

demo: $(STAMP)
	$(BIN)/hf-regtools demo --output-dir outputs

# The whole suite on the installed (newest) stack, then again on the oldest supported stack.
test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-oldest

test-oldest: $(OLDEST_STAMP)
	@PYTHONPATH=$(OLDEST) $(BIN)/python -c "import transformers as t, huggingface_hub as h; \
		print('Oldest supported stack: transformers', t.__version__, '+ huggingface_hub', h.__version__)"
	PYTHONPATH=$(OLDEST) OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/weight_selection.py

clean:
	rm -rf $(VENV) .compat outputs .pytest_cache
