# Plain entry points. `make test` and `make run` set everything up on a fresh machine first.
#   make setup   create .venv and install afs + afs_kernels with their dependencies
#   make test    the test suite, notebooks included (nbval, `smoke` profile)
#   make run     the main job: trains and evaluates every stage in the terminal (numbered stage lines, epochs,
#                an ETA), then runs every notebook top to bottom under the default profile -> out/
#   make lab     JupyterLab on notebooks/, with the same environment (profile, data, runs) as make run
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the notebooks' executed copies and figures go.
OUT    ?= out
# Notebook kernels start in notebooks/: a relative data, cache, runs or figures path
# (`AFS_DATA=../shared/data make test`) is made absolute here, where it was typed.
# Without AFS_DATA, a checkout with the shared folder beside it (../shared/data, the layout CI runs in) uses
# that; otherwise afs looks in ./data and says where it looked.
ifndef AFS_DATA
ifneq ($(wildcard ../shared/data),)
AFS_DATA := ../shared/data
endif
endif
ifdef AFS_DATA
export AFS_DATA := $(abspath $(AFS_DATA))
endif
ifdef AFS_CACHE
export AFS_CACHE := $(abspath $(AFS_CACHE))
endif
ifdef AFS_RUNS
export AFS_RUNS := $(abspath $(AFS_RUNS))
endif
ifdef AFS_FIGURES
export AFS_FIGURES := $(abspath $(AFS_FIGURES))
endif

.PHONY: setup test test-fast run lab clean

setup: $(VENV)/.installed

# torch and torchvision are installed in one pip call so the resolver picks a matching pair
# (a torchvision built for another torch fails to import). torchattacks (a baseline of benchmarks/) comes in
# a pip call of its own, without its dependencies: it pins requests~=2.25.1, which jupyterlab's requests>=2.31
# rules out, and runs on the newer requests (its other needs, numpy, scipy and tqdm, come with afs).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "torchattacks==3.5.1"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The notebooks run under the `smoke` profile here (every code path, tiny data); --nbval-lax checks that
# every cell runs and that the notebooks' own asserts hold, not that numbers equal the committed cpu run's.
test: setup
	AFS_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest tests -x -q

# `afs notebooks` first trains and evaluates every stage of the profile in this terminal (afs.notebooks.prepare_runs),
# into the run directory the kernels read ($AFS_RUNS, else runs/), then executes the notebooks, which only load.
run: setup
	$(BIN)/afs notebooks --out $(OUT)

# Kernels start in notebooks/ (as under `make run`) and see the AFS_* variables above; stop it with Ctrl-C.
# LAB_ARGS passes options on (`make lab LAB_ARGS="--no-browser --port 8899"` on a remote machine); as root
# (a container) Jupyter refuses to start without --allow-root, which is added then.
LAB_ARGS ?=
lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
