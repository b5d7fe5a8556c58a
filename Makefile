# Entry points for a newcomer: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup browser test lint demo demo-resolution demo-dpo bench smoke-real gpu-check clean

setup: $(STAMP) browser

# Reinstall only when the pins or the project metadata change; torch is pinned in the same command.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,serve,eval,lmms,deepspeed,qlora,openclip,video,released]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt lmms-eval
	touch $(STAMP)

# Chromium from the system packages for the web chat's browser test (Playwright's own browser download is
# not used); without apt-get or root the step says so and setup goes on (that test then skips).
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	  echo "make setup: chromium could not be installed; the browser test will skip"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# The offline demo: synthetic shapes data, a tiny VLM trained from scratch on the CPU in two stages,
# held-out accuracy per question type (every turn; turns after the first in the `multi-turn` row), then one
# answer from `sh test.sh`. A quarter of the samples get 1-2 follow-up questions; position pictures hold one shape
# (with a distractor the tiny model picks a side at chance at this budget: docs/benchmarks.md).
DEMO := data/shapes
demo: setup
	$(BIN)/python -m qwenvl_lab.dataprocess.make_shapes $(DEMO) --n-train 6000 --n-val 300 --seed 0 --size 32 --types colour,shape,count,position,multi,shape \
	  --followups 0.25 --followup-set recall --distractor 0
	$(BIN)/python -m qwenvl_lab.dataprocess.make_vocab --data $(DEMO)/train.jsonl --merges 300 --out $(DEMO)/vocab
	$(BIN)/python train.py configs/demo/stage1.yaml
	$(BIN)/python train.py configs/demo/stage2_sft.yaml
	$(BIN)/python -m qwenvl_lab.trainer.evaluate --model runs/demo/stage2 --data $(DEMO)/val.jsonl --image-folder $(DEMO)
	rm -rf runs/demo/eval_vqav2
	$(BIN)/python -m qwenvl_lab.evaluation.to_vqav2 $(DEMO)/val.jsonl --image-folder $(DEMO) --out $(DEMO)/vqav2
	$(BIN)/python -m qwenvl_lab.evaluation --model runs/demo/stage2 --task vqav2 --data $(DEMO)/vqav2 --prompt "{question}" --batch-size 16 --output runs/demo/eval_vqav2
	sh test.sh

# Images at their own resolution (docs/benchmarks.md): colour and shape questions on 128x32 / 32x128 pictures
# with shapes sized by the short side; the same tiny model, data, steps and seed with each picture squashed
# into one 32x32 square (fixed) and read whole by the CNN tower (native resolution, `max_pixels`).
WIDE := data/wide
demo-resolution: setup
	$(BIN)/python -m qwenvl_lab.dataprocess.make_shapes $(WIDE) --n-train 3000 --n-val 300 --seed 0 --size 32 --canvas 4 --types shape,colour,shape
	$(BIN)/python -m qwenvl_lab.dataprocess.make_vocab --data $(WIDE)/train.jsonl --merges 300 --out $(WIDE)/vocab
	$(BIN)/python train.py configs/demo/wide_fixed.yaml
	$(BIN)/python train.py configs/demo/wide_native.yaml
	$(BIN)/python -m qwenvl_lab.trainer.evaluate --model runs/demo_wide/fixed --data $(WIDE)/val.jsonl --image-folder $(WIDE)
	$(BIN)/python -m qwenvl_lab.trainer.evaluate --model runs/demo_wide/native --data $(WIDE)/val.jsonl --image-folder $(WIDE)

# Preference tuning (stage dpo, docs/benchmarks.md): the demo's data without follow-ups, a deliberately short SFT
# run from scratch (130 steps, ~6% of `make demo`'s 2,300, so that count stays weak), pairs made
# from the same data (chosen = the right answer, rejected = another answer of the same question type), stage dpo
# from the SFT model; held-out accuracy per question type before and after.
DPO := data/shapes_dpo
demo-dpo: setup
	$(BIN)/python -m qwenvl_lab.dataprocess.make_shapes $(DPO) --n-train 6000 --n-val 300 --seed 0 --size 32 --types colour,shape,count,position,multi,shape --distractor 0
	$(BIN)/python -m qwenvl_lab.dataprocess.make_vocab --data $(DPO)/train.jsonl --merges 300 --out $(DPO)/vocab
	$(BIN)/python -m qwenvl_lab.dataprocess.make_pref_pairs $(DPO)/train.jsonl --out $(DPO)/pref_train.jsonl --types colour,count,position
	$(BIN)/python -m qwenvl_lab.dataprocess.make_pref_pairs $(DPO)/val.jsonl --out $(DPO)/pref_val.jsonl --types colour,count,position
	$(BIN)/python train.py configs/demo/dpo_sft.yaml
	$(BIN)/python train.py configs/demo/dpo.yaml
	$(BIN)/python -m qwenvl_lab.trainer.evaluate --model runs/demo_dpo/sft --data $(DPO)/val.jsonl --image-folder $(DPO)
	$(BIN)/python -m qwenvl_lab.trainer.evaluate --model runs/demo_dpo/dpo --data $(DPO)/val.jsonl --image-folder $(DPO)

bench: setup
	$(BIN)/python benchmarks/train_step.py --levers baseline,copies,malloc,fused_compile,compile
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/data.py

# The original pair at real shapes on this machine (Qwen-1.8B-Chat config + SigLIP so400m/14-384 shape,
# random weights, LoRA r128): one training step and a 4-token answer beside model.plan's prediction.
# Needs ~12 GB of RAM and minutes on a CPU, so it is not part of `make test` (docs/scale.md).
smoke-real: setup
	$(BIN)/python benchmarks/smoke_real.py

# On a CUDA machine after `make setup`: the kernel self-test and numerics tests compiled for the GPU, attention
# at 1k-8k tokens, a real-shape bf16 LoRA step beside the plan, the step / generation benchmarks, the demo through
# train.py + test.py, a QLoRA step; one report, docs/gpu-check.md (docs/gpu.md). `--dry-run`: the CPU forms.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
