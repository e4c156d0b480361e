# Plain entry points. `make test` and `make run` set everything up on a fresh machine first.
#   make setup   create .venv and install afs + afs_kernels with their dependencies
#   make test    the test suite, notebooks included (nbval, `smoke` profile)
#   make run     the main job: every notebook top to bottom under the default profile -> out/
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the notebooks' executed copies and figures go.
OUT    ?= out
# Notebook kernels start in notebooks/: a relative data or cache path (`AFS_DATA=../shared/data make test`)
# is made absolute here, where it was typed.
ifdef AFS_DATA
export AFS_DATA := $(abspath $(AFS_DATA))
endif
ifdef AFS_CACHE
export AFS_CACHE := $(abspath $(AFS_CACHE))
endif

.PHONY: setup test test-fast run clean

setup: $(VENV)/.installed

# torch and torchvision are installed in one pip call so the resolver picks a matching pair
# (a torchvision built for another torch fails to import).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The notebooks run under the `smoke` profile here (every code path, tiny data); --nbval-lax checks that
# every cell runs and that the notebooks' own asserts hold, not that numbers equal the committed cpu run's.
test: setup
	AFS_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest tests -x -q

run: setup
	$(BIN)/afs notebooks --out $(OUT)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
