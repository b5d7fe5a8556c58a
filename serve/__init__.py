"""Serving a trained VLM: an OpenAI-compatible HTTP API with batching and streaming, and a web chat.

    python -m qwenvl_lab.serve --model RUN_OR_MODEL_DIR [--host 127.0.0.1] [--port 8000]
    python -m qwenvl_lab.serve.web --model RUN_OR_MODEL_DIR [--port 7860]

Modules: `decode` (step-wise batched decoding over the VLM's forward), `prefill` (a prompt's prefill in
pieces: cached prefix, chunks, image rows), `imagecache` (images' placeholder rows by content, LRU),
`prefixcache` (finished requests' KV by prompt prefix, LRU), `kvcache` (row selection, merging and copying
of KV caches), `text` (incremental detokenisation and stop strings), `engine` (the queue and
the decoding thread), `metrics` (Prometheus text for `/metrics`), `protocol` (OpenAI request parsing,
images, limits), `session` (a chat to an engine job, shared by the API and the web chat), `app` (the FastAPI routes),
`web` (the web chat command) and `chat_page` (its Gradio page). Only the VLM's public API is used
(`vlm(...)`, `encode_image_inputs`, `image_token_id`, `tokens_per_image`, `resolution`, `lm.config`, `chat_ids`,
`image_tokens`, `image_inputs`, `stop_token_ids`, `pad_token_id`, `decode`), with `qwen.generation`'s logit
filtering and left padding.
"""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m serve...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
