# Entry points for a newcomer: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# Reinstall only when the pins or the project metadata change; torch is pinned in the same command.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# The offline demo: synthetic shapes data, a tiny VLM trained from scratch on the CPU in two stages,
# held-out accuracy per question type, then one answer from `sh test.sh`.
DEMO := data/shapes
demo: setup
	$(BIN)/python -m dataprocess.make_shapes $(DEMO) --n-train 6000 --n-val 300 --seed 0 --size 32 --types colour,shape,count,position,multi,shape
	$(BIN)/python -m dataprocess.make_vocab --data $(DEMO)/train.jsonl --merges 300 --out $(DEMO)/vocab
	$(BIN)/python train.py configs/demo/stage1.yaml
	$(BIN)/python train.py configs/demo/stage2_sft.yaml
	$(BIN)/python -m trainer.evaluate --model runs/demo/stage2 --data $(DEMO)/val.jsonl --image-folder $(DEMO)
	sh test.sh

bench: setup
	$(BIN)/python benchmarks/train_step.py --levers baseline,copies,malloc,fused_compile,compile
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
