"""The web chat: `python -m qwenvl_lab.serve.web --model RUN_OR_MODEL_DIR [--port 7860] [--examples DIR]`.

One process serves a Gradio chat page at `/` (serve/chat_page.py: multi-image upload, multi-turn
conversations, streamed answers, sampling controls with temperature 0 = greedy by default, example
images) next to the whole OpenAI API of `python -m qwenvl_lab.serve` at `/v1` and `/health`; both go through the
same batching engine. The flags are `python -m qwenvl_lab.serve`'s, plus `--examples DIR`: example images (default:
the demo's held-out shapes images, `data/shapes/images/val`, when present; the first `MAX_EXAMPLES`).

Nothing leaves the machine: gradio's analytics are off, no share link is made, the page loads only files
this server serves, and its Content-Security-Policy (`PAGE_POLICY`, on every response) makes the browser
refuse any other address. A mistake (a missing model, a bad flag, a port in use, gradio not installed)
is one line `error: ...` and exit status 2. Once it runs, a question the page cannot answer (a file that is
not an image, too many images, a prompt too long) is one note in the chat and one line in the log
(serve/chat_page.py); tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.cli import run_cli
from ..model.paths import resolve_model_dir
from .cli import add_server_args, build, fail, run

DEMO_EXAMPLES = Path("data/shapes/images/val")
MAX_EXAMPLES = 8
# The page may load and connect only to this server (inline code and data:/blob: URLs are gradio's own);
# a browser then refuses anything else (gradio's "share" buttons upload to the hub when run in a Space).
PAGE_POLICY = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:; connect-src 'self'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class ContentSecurityPolicy:
    """ASGI middleware: every response carries `policy` as its Content-Security-Policy header."""

    def __init__(self, app, policy: str) -> None:
        self.app, self.header = app, (b"content-security-policy", policy.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        return await self.app(scope, receive, send_with_policy)


def example_images(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [p.resolve() for p in files[:MAX_EXAMPLES]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.serve.web", description="Web chat with a trained VLM.")
    add_server_args(ap, port=7860)
    ap.add_argument("--examples", default=None, help=f"folder of example images (default: {DEMO_EXAMPLES} if present)")
    args = ap.parse_args(argv)
    if args.examples is not None and not Path(args.examples).is_dir():
        fail(f"--examples {args.examples}: not a directory")
    resolve_model_dir(args.model)  # a wrong --model is named first, also where gradio is missing
    # Before gradio is imported anywhere: its telemetry reads this variable.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:  # heavy and optional: imported after the arguments are checked
        import gradio as gr

        from .chat_page import CSS, build_ui
    except ImportError as e:
        fail(f"the web chat needs gradio ({e}); install it with pip install -c constraints.txt '.[serve]'")
    app, engine, name = build(args)
    examples = example_images(Path(args.examples) if args.examples else DEMO_EXAMPLES)
    ui = build_ui(engine.vlm, engine, name, app.state.limits, examples, request_timeout_s=args.request_timeout)
    gr.mount_gradio_app(app, ui, path="/", server_name=args.host, server_port=args.port, footer_links=[],
                        run_history=False, ssr_mode=False, mcp_server=False, show_error=True, css=CSS,
                        max_file_size=int(args.max_body_mb * (1 << 20)))
    app.add_middleware(ContentSecurityPolicy, policy=PAGE_POLICY)
    return run(app, engine, args, f"web chat with {name!r}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
