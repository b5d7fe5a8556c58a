"""The web chat: `python -m serve.web --model RUN_OR_MODEL_DIR [--port 7860] [--examples DIR]`.

One process serves the chat page at `/` next to the whole OpenAI API of `python -m serve` (same flags,
same engine): multi-image upload, multi-turn conversations, streamed answers, sampling controls
(temperature 0 = greedy by default, top_p, max tokens, seed) and example images to click.
`--examples DIR` names the example images (default: the demo's held-out shapes images,
`data/shapes/images/val`, when present); `GET /web/examples` lists up to `MAX_EXAMPLES` of them and
`GET /web/examples/NAME` serves one (only names from that list).

The page is `serve/static/chat.html`, plain HTML and JavaScript with no external files, so it works offline.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from serve.cli import add_server_args, build, fail, run
from trainer.cli import run_cli

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
DEMO_EXAMPLES = Path("data/shapes/images/val")
MAX_EXAMPLES = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def example_images(folder: Path | None) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return {p.name: p for p in files[:MAX_EXAMPLES]}


def add_web_routes(app: FastAPI, model_name: str, examples: dict[str, Path], default_max_tokens: int) -> None:
    page = (PAGE.read_text(encoding="utf-8").replace("__MODEL__", html.escape(model_name))
            .replace("__MAX_TOKENS__", str(default_max_tokens)))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/web/examples")
    async def example_list() -> list[str]:
        return list(examples)

    @app.get("/web/examples/{name}")
    async def example_file(name: str):
        if name not in examples:  # only the listed files: no path from the client reaches the disk
            return JSONResponse({"error": {"message": f"no example named {name!r}"}}, status_code=404)
        return FileResponse(examples[name])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.web", description="Web chat with a trained VLM.")
    add_server_args(ap, port=7860)
    ap.add_argument("--examples", default=None, help=f"folder of example images (default: {DEMO_EXAMPLES} if present)")
    args = ap.parse_args(argv)
    if args.examples is not None and not Path(args.examples).is_dir():
        fail(f"--examples {args.examples}: not a directory")
    app, engine, name = build(args)
    examples = example_images(Path(args.examples) if args.examples else DEMO_EXAMPLES)
    add_web_routes(app, name, examples, min(args.default_max_tokens, args.max_tokens))
    return run(app, engine, args, f"web chat with {name!r}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
