"""Command-line entry points of the server (`python -m qwenvl_lab.serve`) and the web chat (`python -m qwenvl_lab.serve.web`).

`add_server_args(parser, port)` declares the shared flags; `build(args) -> (app, engine)` loads the model
(`--model` takes a run directory or a model directory, as test.py does) and wires the engine and the
routes; `run(app, engine, args)` serves until interrupted. A
released family served through its own generate (`serve.generate_engine`, Qwen2-VL) gets `GenerateEngine`:
one request at a time, said in one line at start. A missing model, a bad flag, a port in use or
a missing fastapi / uvicorn (the `serve` extra) is one line `error: ...` on stderr and exit status 2
(`core.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import socket
from pathlib import Path

from ..core.errors import UserError
from ..dataset.images import MAX_PIXELS
from ..model.paths import resolve_model_dir


def add_server_args(ap: argparse.ArgumentParser, port: int) -> None:
    ap.add_argument("--model", required=True, help="run directory or saved model directory")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                    "directory's name)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503")
    ap.add_argument("--max-tokens", type=int, default=2048, help="the largest max_tokens a request may ask")
    ap.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + max_tokens limit (default: the LM's max_position_embeddings)")
    ap.add_argument("--max-images", type=int, default=8, help="images per request")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="pixels per image (width x height)")
    ap.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request ends (504)")
    ap.add_argument("--image-folder", default=None, help="allow image paths inside this folder")
    ap.add_argument("--allow-remote-images", action="store_true",
                    help="fetch http(s) image URLs (the server then makes requests on clients' behalf)")
    ap.add_argument("--image-cache-mb", type=float, default=256.0,
                    help="memory for images' encoded rows kept by content (0 turns the cache off)")
    ap.add_argument("--prefix-cache-mb", type=float, default=1024.0,
                    help="memory for finished requests' KV reused by later requests that start the same way "
                         "(the next turn of a chat); 0 turns the cache off")
    ap.add_argument("--prefill-chunk", type=int, default=2048,
                    help="prompt tokens prefilled per step while other requests decode (a long prompt is "
                         "prefilled in pieces between their steps)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def fail(message: str) -> None:
    raise UserError(f"serve: {message}")


def check_server_packages() -> None:
    """FastAPI and uvicorn are the `serve` extra: say which is missing before the model loads."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"the server needs {' and '.join(missing)}, not installed: pip install -c constraints.txt '.[serve]'")


def check_port(host: str, port: int) -> None:
    """A port already taken is a user mistake: say so before the model loads."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            fail(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port")


def _model_len(vlm, given: int | None) -> int | None:
    if given is not None:
        return given
    # Both LM backends keep the context length in their config under the transformers name.
    return getattr(getattr(vlm.lm, "config", None), "max_position_embeddings", None)


def build(args: argparse.Namespace):
    for flag in ("max_batch_size", "max_tokens", "default_max_tokens", "max_images", "max_pixels"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.max_body_mb <= 0 or args.request_timeout <= 0:
        fail("--max-queue must be >= 0, --max-body-mb and --request-timeout > 0")
    if args.image_cache_mb < 0 or args.prefix_cache_mb < 0 or args.prefill_chunk < 1:
        fail("--image-cache-mb and --prefix-cache-mb must be >= 0 and --prefill-chunk >= 1")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        fail(f"--image-folder {args.image_folder}: not a directory")
    model_dir = resolve_model_dir(args.model)
    check_port(args.host, args.port)
    check_server_packages()
    # Heavy (torch, transformers, FastAPI): after every argument is checked, so a mistake fails in a second.
    import torch

    from ..model import VLM
    from .app import create_app
    from .engine import Engine
    from .generate_engine import GenerateEngine, uses_own_generate
    from .protocol import Limits

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlm = VLM.from_pretrained(model_dir).to(device).eval()
    name = args.served_model_name or Path(args.model).resolve().name
    limits = Limits(max_images=args.max_images, max_pixels=args.max_pixels, max_tokens=args.max_tokens,
                    default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                    max_model_len=_model_len(vlm, args.max_model_len), image_folder=args.image_folder,
                    allow_remote_images=args.allow_remote_images)
    if uses_own_generate(vlm):  # e.g. Qwen2-VL's M-RoPE: the model's own generate, one request at a time
        engine = GenerateEngine(vlm, max_queue=args.max_queue)
        print(f"{name}: {vlm.family.name} is decoded by the model's own generate, one request at a time "
              f"(--max-batch-size {args.max_batch_size} and the image / prefix caches do not apply)", flush=True)
    else:
        engine = Engine(vlm, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                        image_cache_bytes=int(args.image_cache_mb * (1 << 20)),
                        prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)), prefill_chunk=args.prefill_chunk)
    app = create_app(vlm, engine, name, limits, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                     request_timeout_s=args.request_timeout)
    return app, engine, name


def run(app, engine, args: argparse.Namespace, what: str) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    engine.start()
    print(f"{what} on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.serve", description="OpenAI-compatible server for a trained VLM.")
    add_server_args(ap, port=8000)
    args = ap.parse_args(argv)
    app, engine, name = build(args)
    return run(app, engine, args, f"serving {name!r} (OpenAI API at /v1)")
