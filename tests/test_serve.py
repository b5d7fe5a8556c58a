"""The OpenAI-compatible server, started for real on 127.0.0.1 and spoken to with the official `openai`
client: greedy answers equal test.py's, streaming, 32 concurrent clients, bad requests, a full queue and
a client that goes away. One server for the module (a start costs the imports and the model load)."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tiny_serve import QUESTION, data_url, image, messages, stopping_vlm
from tests.tiny_server import answer_of_test_py, start_server

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (pip install .[dev])")
pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install .[serve])")

MAX_PIXELS = 40 * 30  # the test images are 40x30; a bigger one is over the limit
FLAGS = ["--max-batch-size", "8", "--max-queue", "24", "--max-images", "2", "--max-pixels", str(MAX_PIXELS),
         "--max-body-mb", "0.25", "--max-tokens", "4000", "--max-model-len", "8192"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    vlm = stopping_vlm(tmp)
    model_dir = tmp / "model"
    vlm.save_pretrained(model_dir)
    image(0).save(tmp / "q.png")
    server = start_server("qwenvl_lab.serve", model_dir, *FLAGS, log_dir=tmp)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield vlm, server, client, tmp
    server.stop()


def _user(question: str, images: list, text_first: bool = False) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
    text = [{"type": "text", "text": question}]
    return [{"role": "user", "content": text + parts if text_first else parts + text}]


def test_plain_and_streamed_answers_equal_test_py(setup, capsys):
    vlm, server, client, tmp = setup
    model = client.models.list().data[0].id
    assert model == "model"
    expect = answer_of_test_py(["--model", str(tmp / "model"), "--image", str(tmp / "q.png"), "--prompt", QUESTION,
                              "--max-new-tokens", "8"], capsys)
    assert expect  # the fixture's model answers a few tokens and stops with end-of-turn

    r = client.chat.completions.create(model=model, messages=_user(QUESTION, [image(0)]), temperature=0,
                                       max_tokens=8)
    assert r.choices[0].message.content == expect
    assert r.choices[0].finish_reason == "stop"  # end-of-turn, before max_tokens
    n_prompt = len(vlm.chat_ids(messages(), 1))
    assert r.usage.prompt_tokens == n_prompt and 0 < r.usage.completion_tokens < 8
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=model, messages=_user(QUESTION, [image(0)]), temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expect
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # max_tokens cuts the answer: finish_reason "length"; a stop string cuts it where it appears.
    r = client.chat.completions.create(model=model, messages=_user(QUESTION, [image(0)]), temperature=0,
                                       max_tokens=1)
    assert r.choices[0].finish_reason == "length" and expect.startswith(r.choices[0].message.content)
    stop = expect[1:2]
    r = client.chat.completions.create(model=model, messages=_user(QUESTION, [image(0)]), temperature=0,
                                       max_tokens=8, stop=[stop])
    assert r.choices[0].message.content == expect[:expect.index(stop)]


def test_sampling_with_a_seed_repeats(setup):
    _, _, client, _ = setup
    kw = dict(model="model", messages=_user(QUESTION, [image(1)]), temperature=1.5, top_p=0.9, max_tokens=6,
              seed=123, extra_body={"ignore_eos": True})
    a, b = (client.chat.completions.create(**kw).choices[0] for _ in range(2))
    assert a.message.content == b.message.content and a.finish_reason == "length"


def test_32_concurrent_clients_each_get_their_sequential_answer(setup):
    vlm, server, client, _ = setup
    # 8 different conversations (1 or 2 images, text before or after them, a system prompt), 4 clients each.
    convs = []
    for i in range(8):
        imgs = [image(i)] + ([image(i + 1)] if i % 3 == 0 else [])
        msgs = _user(f"Question {i}: what do you see" + "?" * i, imgs, text_first=i % 2 == 1)
        if i % 4 == 2:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs
        convs.append(msgs)
    sequential = []
    for msgs in convs:
        r = client.chat.completions.create(model="model", messages=msgs, temperature=0, max_tokens=6)
        sequential.append(r.choices[0].message.content)
    # The server's answer alone is vlm.chat's (the same prompt rendering as test.py).
    first = convs[0][0]["content"]
    n_img = sum(p["type"] == "image_url" for p in first)
    assert sequential[0] == vlm.chat([image(0), image(1)][:n_img],
                                     [{"role": "user", "content": "<image>" * n_img + "\n" + first[-1]["text"]}],
                                     max_new_tokens=6)

    def ask(i: int) -> str:
        return client.chat.completions.create(model="model", messages=convs[i % 8], temperature=0,
                                              max_tokens=6).choices[0].message.content

    before = server.get("/health")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == [sequential[i % 8] for i in range(32)]
    after = server.get("/health")
    assert after["admitted"] - before["admitted"] == 32
    assert after["max_batch"] > 1  # requests were decoded together, not one at a time


def test_a_second_chat_turn_reports_cached_tokens_and_metrics_count_it(setup):
    vlm, server, client, _ = setup
    turn1 = _user("Describe the picture, please.", [image(2)])
    r1 = client.chat.completions.create(model="model", messages=turn1, temperature=0, max_tokens=6)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the colours?"}]
    before = _metrics(server)
    r2 = client.chat.completions.create(model="model", messages=turn2, temperature=0, max_tokens=6)
    after = _metrics(server)
    # The whole first turn's prompt (at least) came from the prefix cache; the answer is the uncached one.
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    msgs = [{"role": "user", "content": "<image>\nDescribe the picture, please."},
            {"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "And the colours?"}]
    assert r2.choices[0].message.content == vlm.chat([image(2)], msgs, max_new_tokens=6)
    moved = {k: after[k] - before[k] for k in ("qwenvl_serve_prefix_cache_hits_total",
                                               "qwenvl_serve_prefix_cache_cached_tokens_total",
                                               "qwenvl_serve_time_to_first_token_seconds_count")}
    assert moved == {"qwenvl_serve_prefix_cache_hits_total": 1,
                     "qwenvl_serve_prefix_cache_cached_tokens_total": r2.usage.prompt_tokens_details.cached_tokens,
                     "qwenvl_serve_time_to_first_token_seconds_count": 1}


def _metrics(server) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _post(server, body: bytes, content_type: str = "application/json") -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": content_type})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), json.loads(data)


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(setup):
    _, server, client, tmp = setup

    status, _, body = _post(server, b'{"model": "model", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]

    def error_of(**kw):
        kw.setdefault("model", "model")
        kw.setdefault("max_tokens", 4)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**kw)
        return e.value.status_code, e.value.body if isinstance(e.value.body, dict) else {}

    status, err = error_of(model="gpt-4o", messages=_user("hi", []))
    assert status == 404 and err.get("code") == "model_not_found" and "gpt-4o" in err["message"]

    bad_b64 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                            {"type": "text", "text": "hi"}]}]
    status, err = error_of(messages=bad_b64)
    assert status == 400 and "base64" in err["message"] and "messages[0].content[0]" in err["message"]

    status, err = error_of(messages=_user("hi", [image(0, size=(80, 60))]))
    assert status == 413 and "4800 pixels" in err["message"]

    status, err = error_of(messages=_user("hi", [image(0), image(1), image(2)]))
    assert status == 400 and "3 images" in err["message"]

    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                           {"type": "text", "text": "hi"}]}]
    status, err = error_of(messages=remote)
    assert status == 400 and "remote image URLs are refused" in err["message"]

    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp / "q.png")}},
                                          {"type": "text", "text": "hi"}]}]
    status, err = error_of(messages=local)
    assert status == 400 and "--image-folder" in err["message"]

    status, err = error_of(messages=_user("hi", [image(0)]), max_tokens=5000)
    assert status == 400 and err["param"] == "max_tokens"

    status, _, body = _post(server, json.dumps({"model": "model", "messages": _user("x" * 300_000, [])}).encode())
    assert status == 413 and "limit" in body["error"]["message"]

    r = client.chat.completions.create(model="model", messages=_user(QUESTION, [image(0)]), temperature=0,
                                       max_tokens=8)
    assert r.choices[0].message.content  # still serving
    assert server.proc.poll() is None


def _open_stream(server, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    body = json.dumps({"model": "model", "messages": _user(QUESTION, [image(0)]), "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_full_queue_gets_503_and_clients_that_leave_stop_their_generation(setup):
    _, server, _, _ = setup
    before = server.get("/health")
    # 8 running + 24 waiting fill the server; each would take 3000 tokens, far longer than this test.
    opened = []
    for _ in range(32):
        conn, r = _open_stream(server, 3000)
        assert r.status == 200
        opened.append(conn)
    conn, r = _open_stream(server, 3000)
    assert r.status == 503 and r.getheader("Retry-After") == "1"
    assert "busy" in json.loads(r.read())["error"]["message"]
    conn.close()
    busy = server.get("/health")
    assert busy["running"] + busy["waiting"] == 32 and busy["running"] <= 8

    for c in opened:  # every client goes away mid-answer
        c.close()
    for _ in range(300):
        now = server.get("/health")
        if now["running"] == 0 and now["waiting"] == 0:
            break
        time.sleep(0.2)
    assert now["running"] == 0 and now["waiting"] == 0, now
    assert now["cancelled"] - before["cancelled"] == 32
    assert now["finished"] == before["finished"]  # none ran to its 3000 tokens


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.serve.cli import main

    assert run_cli(main, ["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]
    assert run_cli(main, ["--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
