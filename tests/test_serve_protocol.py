"""Request parsing and image sources of the server (serve/protocol.py), without a model or a server."""

from __future__ import annotations

import http.server
import threading

import pytest
from qwenvl_lab.serve.protocol import ApiError, ImageSource, Limits, load_image_source, parse_chat

from tests.tiny_serve import data_url, image


def _body(content, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def test_content_parts_render_like_test_py_and_sampling_fields_parse():
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    req = parse_chat(_body([img, img, {"type": "text", "text": "Which differs?"}], max_tokens=7, temperature=0,
                           top_p=0.5, seed=3, stop="END", stream=True, stream_options={"include_usage": True}),
                     "m", Limits())
    assert req.messages == [{"role": "user", "content": "<image><image>\nWhich differs?"}]
    assert [s.where for s in req.images] == ["messages[0].content[0]", "messages[0].content[1]"]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, req.stop, req.stream, req.include_usage) == (
        7, 0.0, 0.5, 3, ["END"], True, True)
    text_first = parse_chat(_body([{"type": "text", "text": "What is"}, {"type": "text", "text": " this?"}, img]),
                            "m", Limits(default_max_tokens=9))
    assert text_first.messages[0]["content"] == "What is this?\n<image>"
    assert text_first.params.max_tokens == 9 and text_first.params.temperature == 1.0  # OpenAI's default


@pytest.mark.parametrize("body,status,needle", [
    (_body("hi", model="other"), 404, "not served"),
    (_body("hi", n=2), 400, "'n'"),
    (_body("hi", max_tokens=0), 400, "max_tokens"),
    (_body("hi", temperature="hot"), 400, "temperature"),
    (_body("hi", tools=[{"type": "function"}]), 400, "tool"),
    (_body("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (_body([{"type": "audio"}]), 400, "unsupported content part"),
    (_body("look <image> here"), 400, "image_url parts"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, "last message"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_name_the_field(body, status, needle):
    with pytest.raises(ApiError) as e:
        parse_chat(body, "m", Limits(max_tokens=100))
    assert e.value.status == status and needle in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_image_sources_data_folder_and_remote(tmp_path):
    limits = Limits(image_folder=str(tmp_path))
    assert load_image_source(ImageSource("x", data_url(image(1))), limits).size == (40, 30)
    image(2).save(tmp_path / "a.png")
    assert load_image_source(ImageSource("x", "a.png"), limits).size == (40, 30)
    assert load_image_source(ImageSource("x", f"file://{tmp_path / 'a.png'}"), limits).size == (40, 30)
    for url, needle in [("../outside.png", "outside the image folder"), ("missing.png", "not found"),
                        ("data:image/png;base64," + "QUJD", "not a readable image"), ("ftp://h/a.png", "scheme")]:
        with pytest.raises(ApiError) as e:
            load_image_source(ImageSource("messages[0].content[0]", url), limits)
        assert e.value.status == 400 and needle in e.value.message and "messages[0].content[0]" in e.value.message
        assert "serve_img_" not in e.value.message  # a temporary file's name never reaches the client

    # http(s): refused by default; with --allow-remote-images fetched (here from a loopback server).
    png = (tmp_path / "a.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.png"
        with pytest.raises(ApiError, match="remote image URLs are refused"):
            load_image_source(ImageSource("x", url), Limits())
        assert load_image_source(ImageSource("x", url), Limits(allow_remote_images=True)).size == (40, 30)
        with pytest.raises(ApiError) as e:
            load_image_source(ImageSource("x", url), Limits(allow_remote_images=True, remote_max_bytes=10))
        assert e.value.status == 413
    finally:
        server.shutdown()
        server.server_close()
