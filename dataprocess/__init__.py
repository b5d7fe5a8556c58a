"""Offline data preparation: converters to our JSONL, an image cache builder, a synthetic dataset.

Each module is a command (`python -m qwenvl_lab.dataprocess.NAME --help`) with a `main(argv=None)` and a pure
function that does the work (so tests call it directly):

| module | pure function | does |
|---|---|---|
| `coco_captions` | `convert_coco` | COCO captions -> stage-1 caption samples |
| `llava_instruct` | `convert_llava` | LLaVA instruct sets (detail_23k, complex_reasoning_77k, mix665k) |
| `ai_challenger` | `convert_ai_challenger` | AI Challenger Chinese captions, fixed Chinese prompts |
| `image_map` | `convert_image_map` | the original repo's image_map + captions files (JSON or TSV) |
| `process_image` | `process_folder` | pad / resize / crop a folder into a cache, several processes |
| `make_shapes` | `make_shapes` | coloured-shapes Q&A with one-word answers, train/val splits |
| `make_vocab` | `train_bpe` | a small BPE vocabulary as a `qwen.tiktoken` file for a from-scratch LM |

`bigbro` is no command of its own: it turns the BigBro repo's train.py / test.py flags into ours for
train.py and test.py (`train_argv`, `test_argv`, `resolve_init_from`), converting its data on the way.

Our JSONL, written by every converter (see `common.py`): one sample per line,
`{"id", "messages": [{"role", "content"}], "images": [relative paths], "videos": []}` with one
`<image>` marker per image, in order. `dataset/` reads it like any LLaMA-Factory-style file.
"""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m dataprocess...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
