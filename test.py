"""Ask a trained VLM about images.

    python test.py --model RUN_OR_MODEL_DIR --image a.jpg [--image b.jpg] --prompt "What is in the picture?"
    python test.py --model RUN_DIR --image a.jpg                      # interactive multi-turn chat
    python test.py --model RUN_DIR --input questions.jsonl --output answers.jsonl [--image-folder DIR]
    python test.py --model LLAVA_NEXT_VIDEO_DIR --video clip.mp4 [--frames 8] --prompt "What happens?"

`--model` takes a run directory (its `final/` model, else its newest checkpoint) or a saved model
directory. Decoding is greedy unless `--do-sample` is given. `--stream` prints tokens as they come.

`--lm` / `--tower` point the model at another copy of its base LM / vision tower (a local directory).
The original (BigBro) repo's command keeps working: `--base_language_model ID --base_value_model ID
--model_weights DIR --image_path IMG --prompt "...<|extra_0|>..."` (the `<|extra_0|>` in the prompt
marks where the image goes); each of its flags is an alias that says its spelling here (dataprocess/bigbro.py),
and DIR may be one of its own checkpoints (adapter_model.bin + other_params.bin), converted once beside it.

`--model` may also be a transformers Llava or LLaVA-NeXT directory (config.json model_type "llava" /
"llava_next"); a model with a resolution rule (anyres, native) gives each image the span its size gets.
`--video` (with `--prompt`; a released family that takes videos: Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT-Video,
LLaVA-OneVision) samples
`--frames` frames with our frame sampler and puts the video where the prompt's `<video>` marker is (first
when it has none); a model without a video input says so in one line.

A mistake (a missing or unreadable image, an image whose size the model's resolution rule refuses, a model
directory without a model, a hub name while offline, a data file that is not JSON) ends with one line
`error: ...` (exit status 2; `--debug` shows the traceback); in the interactive chat a bad `/image` is
reported and the chat goes on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Light modules only at the top, so `--help` answers before torch loads; heavy ones load where used.
from qwenvl_lab.core.cli import run_cli, writable_dir
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.dataprocess.bigbro import test_argv
from qwenvl_lab.dataset.images import load_image, load_video_frames
from qwenvl_lab.dataset.sample import IMAGE_MARKER, VIDEO_MARKER
from qwenvl_lab.model.paths import is_bigbro_dir, resolve_model_dir
from qwenvl_lab.trainer.evaluate import load_samples, write_answers

LEGACY_PLACEHOLDER = "<|extra_0|>"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Image question answering with a trained VLM.")
    ap.add_argument("--model", help="run directory or saved model directory")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ap.add_argument("--video", action="append", default=[], help="a video file (with --prompt; repeat for several)")
    ap.add_argument("--frames", type=int, default=8, help="frames sampled from each --video (default 8)")
    ap.add_argument("--prompt", help="the question; without it, an interactive chat starts")
    ap.add_argument("--system", default=None, help="a system prompt (none by default)")
    ap.add_argument("--input", help="JSONL/JSON file of samples to answer in batches")
    ap.add_argument("--output", help="where --input answers go (JSONL)")
    ap.add_argument("--image-folder", default=None, help="folder that --input image paths are relative to")
    ap.add_argument("--allow-absolute-paths", action="store_true",
                    help="accept --input image paths outside the image folder (trusted files only)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--do-sample", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", action="store_true", help="print the answer token by token")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--lm", default=None, help="the base LM's hub id or directory (a BigBro checkpoint needs it)")
    ap.add_argument("--tower", default=None, help="the vision tower's hub id or directory (likewise)")
    args = ap.parse_args(test_argv(list(sys.argv[1:] if argv is None else argv)))  # BigBro flags: aliases
    if not args.model:
        ap.error("give --model RUN_OR_MODEL_DIR (or the original --model_weights with the base models)")
    if args.input and not args.output:
        ap.error("--input needs --output")
    if args.video and (args.input or args.prompt is None):
        ap.error("--video needs --prompt (one question about the video)")
    if args.frames < 1:
        ap.error("--frames must be at least 1")
    return args


def load_model(args, model_dir: Path):
    """The model, on its device, in eval mode; then the random seed of the answers is set."""
    import torch  # heavy: after the arguments and files are checked
    from qwenvl_lab.model import VLM
    from qwenvl_lab.model.bigbro import load_bigbro  # its .bin files, converted once beside them

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_bigbro_dir(model_dir):
        vlm = load_bigbro(model_dir, args.lm, args.tower).to(device).eval()
    else:
        overrides = {k: v for k, v in (("lm", args.lm), ("tower_path", args.tower)) if v}
        vlm = VLM.from_pretrained(model_dir, **overrides).to(device).eval()
    torch.manual_seed(args.seed)
    return vlm


def gen_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
    )


def _streamer(vlm):
    """Print decoded text as tokens arrive (decoding the growing id list keeps multi-byte characters whole)."""
    ids: list[int] = []
    shown = [0]
    stops = set(vlm.stop_token_ids) | {vlm.pad_token_id}

    def on_token(batch_index: int, token_id: int) -> None:
        if token_id in stops:
            return
        ids.append(token_id)
        text = vlm.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    return on_token


def answer(vlm, images, messages, args, videos=None) -> str:
    kw = gen_kwargs(args)
    if args.stream:
        kw["streamer"] = _streamer(vlm)
    if videos:
        kw["videos"] = videos  # only a model with a video input (checked in main) takes them
    reply = vlm.chat(images, messages, **kw)
    if args.stream:
        print()
    return reply


def load_images(paths: list[str]):
    return [load_image(p) for p in paths]  # a missing or bad file is a BadSampleError (a UserError)


def check_images(vlm, images: list, names: list[str]) -> None:
    """Each image against the model's resolution rule (`vlm.image_tokens`); a size it refuses (native mode:
    an aspect ratio over 200) is the user's mistake, named by its file."""
    for img, name in zip(images, names):
        try:
            vlm.image_tokens([img])  # None in fixed mode
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def run_batch_file(vlm, pairs: list, args) -> None:
    n = write_answers(vlm, pairs, args.output, batch_size=args.batch_size, system=args.system, **gen_kwargs(args))
    print(f"answered {n} samples -> {args.output}")


def interactive(vlm, images, args) -> None:
    messages: list[dict] = []
    shown: list = []  # images already placed in the conversation, in marker order
    pending = list(images)  # images to place in the next user turn
    print(f"{len(images)} image(s) loaded. Empty line or Ctrl-D quits; /image PATH adds an image.")
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text.startswith("/image"):
            try:
                path = text[len("/image"):].strip()
                new = load_images([path])
                check_images(vlm, new, [f"/image {path}"])
                pending += new
            except UserError as e:  # a bad path ends this command, not the chat
                print(f"error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": IMAGE_MARKER * len(pending) + ("\n" if pending else "") + text})
        shown, pending = shown + pending, []
        print("assistant> ", end="" if args.stream else "\n", flush=True)
        reply = answer(vlm, shown, with_system(messages, args.system), args)
        if not args.stream:
            print(reply)
        messages.append({"role": "assistant", "content": reply})


def single_prompt(prompt: str, n_images: int) -> str:
    """--prompt with one image marker per --image (all first when it has none); a mismatch is a UserError,
    which `vlm.chat_ids` would only raise once the model has loaded."""
    if LEGACY_PLACEHOLDER in prompt:
        prompt = prompt.replace(LEGACY_PLACEHOLDER, IMAGE_MARKER)
    return _with_markers(prompt, IMAGE_MARKER, n_images, "--image file(s)", "image")


def video_prompt(prompt: str, n_videos: int) -> str:
    """The prompt with one `<video>` marker per --video (all first when it has none)."""
    return _with_markers(prompt, VIDEO_MARKER, n_videos, "--video file(s)", "video")


def _with_markers(prompt: str, marker: str, n: int, files: str, what: str) -> str:
    if n and marker not in prompt:
        prompt = marker * n + "\n" + prompt
    if prompt.count(marker) != n:
        raise UserError(f"--prompt has {prompt.count(marker)} {marker} marker(s) for {n} {files}; give one marker "
                        f"per {what}, or none to put them all first")
    return prompt


def check_videos(vlm, paths: list[str], model: str) -> None:
    if paths and getattr(vlm, "video_token", None) is None:
        raise UserError(f"--video: {model} takes no videos (a released Qwen2-VL, LLaVA-NeXT-Video or "
                        f"LLaVA-OneVision checkpoint does); ask about frames as --image files instead")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Everything the user named is checked before the model loads: a wrong path fails in a second.
    images = load_images(args.image)
    videos = [load_video_frames(p, args.frames) for p in args.video]  # our frame sampler; a bad file: one line
    bigbro = is_bigbro_dir(args.model) and args.lm and args.tower  # else resolve_model_dir says what is missing
    model_dir = Path(args.model) if bigbro else resolve_model_dir(args.model)
    if args.input:
        # Not JSON / JSONL, not UTF-8, a bad sample: one line now rather than after the model.
        pairs = load_samples(args.input, args.image_folder, args.allow_absolute_paths)
        writable_dir(Path(args.output).resolve().parent, "--output's directory")
    prompt = None if args.input or args.prompt is None else single_prompt(args.prompt, len(images))
    prompt = prompt if prompt is None else video_prompt(prompt, len(videos))
    vlm = load_model(args, model_dir)  # and the seed
    check_images(vlm, images, [f"--image {p}" for p in args.image])
    check_videos(vlm, args.video, args.model)
    if args.input:
        run_batch_file(vlm, pairs, args)
        return 0
    if prompt is None:
        interactive(vlm, images, args)
        return 0
    reply = answer(vlm, images, with_system([{"role": "user", "content": prompt}], args.system), args, videos)
    if not args.stream:
        print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
