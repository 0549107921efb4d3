"""`mmaudit serve` and the black-box EndpointAdapter, over real HTTP on 127.0.0.1.

An untrained tiny LLaVA is enough: the protocol, not the answers, is under test. Its
vocabulary is cut to 20 tokens, so `top_logprobs=20` lists every token and first-token
log-probabilities from the endpoint are exact, comparable with the white-box adapter.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import inspect
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from audit.adapters import Query, load_adapter  # noqa: E402
from audit.adapters.endpoint import EndpointAdapter, image_data_url  # noqa: E402
from audit.errors import InputError  # noqa: E402
from reference_models.serve import ChatRequest, Limits, _Batcher, create_app, generate_steps, serve  # noqa: E402
from reference_models.synthetic import COLOURS, split_words  # noqa: E402

PROMPT = "what colour are the shapes?"
WORDS = sorted({*split_words(PROMPT), *COLOURS})
TOL = 1e-4
CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------------- helpers
def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def body(prompt: str, image: Image.Image | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}] if image is not None else []
    content.append({"type": "text", "text": prompt})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def png_header(side: int) -> bytes:
    """A tiny PNG whose header claims side x side 1-bit pixels (the pixel data is left empty)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def canned(status: int, payload: bytes, content_type: str = "application/json"):
    """A throwaway HTTP server answering every request with one canned response; yields (url, hits)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            hits.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = answer

        def log_message(self, *args):  # keep pytest output clean
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    finally:
        srv.shutdown()
        srv.server_close()


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    """Two logprobs.content lists agree: same tokens, log-probs within TOL."""
    assert [t["token"] for t in a] == [t["token"] for t in b]
    for x, y in zip(a, b):
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        np.testing.assert_allclose([x["logprob"], *(t["logprob"] for t in x["top_logprobs"])],
                                   [y["logprob"], *(t["logprob"] for t in y["top_logprobs"])], atol=TOL)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from reference_models.architectures import build_reference_model

    path = tmp_path_factory.mktemp("serve") / "tiny-llava"
    model, proc = build_reference_model(arch="llava", preset="tiny", words=WORDS, seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def white(model_dir):
    """The white-box reference; a separate instance from the server's (adapters are not thread-safe)."""
    adapter = load_adapter(model_dir)
    assert len(adapter.tokenizer) <= 20  # top_logprobs=20 then lists every token
    return adapter


class Counting:
    """An adapter with its model calls recorded: a refusal must come before any of them."""

    MODEL_CALLS = ("forward", "generate_detailed", "sequence_logprobs")

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if name not in self.MODEL_CALLS:
            return value

        def counted(*args, **kwargs):
            self.calls.append(name)
            return value(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def served(model_dir):
    counting = Counting(load_adapter(model_dir))
    with running(create_app(adapter=counting, model_name="tiny-llava")) as base:
        yield base, counting


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def endpoint(url):
    adapter = EndpointAdapter(url, retries=2, timeout=60)
    yield adapter
    adapter.close()


@pytest.fixture(scope="module")
def queries():
    return [Query(PROMPT, picture(s), COLOURS) for s in range(3)] + [Query(PROMPT, None, COLOURS),
                                                                    Query("red blue", None, COLOURS)]


# ---------------------------------------------------------------------- 1-3, 8: protocol against the white box
def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llava"


def test_unknown_route_gets_json_error(client):
    for resp in (client.get("/nope"), client.get(CHAT)):
        assert resp.status_code in (404, 405) and "error" in resp.json()


def test_chat_completion_shape_and_greedy_text(client, white):
    q = Query(PROMPT, picture(0), ())
    resp = client.post(CHAT, json=body(q.prompt, q.image, max_tokens=6, logprobs=True, top_logprobs=5))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny-llava"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == white.generate([q], max_new_tokens=6)[0]
    steps = choice["logprobs"]["content"]
    assert 1 <= len(steps) <= 6 and data["usage"]["completion_tokens"] == len(steps)
    for step in steps:
        assert isinstance(step["token"], str) and step["logprob"] <= 0
        tops = step["top_logprobs"]
        assert len(tops) == 5 and all({"token", "logprob", "bytes"} <= set(t) for t in tops)
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert abs(step["logprob"] - tops[0]["logprob"]) < TOL  # greedy: the chosen token is the top one
    assert choice["finish_reason"] == ("length" if len(steps) == 6 and steps[-1]["token"] != "</s>" else "stop")


def test_logprobs_absent_unless_asked(client):
    data = client.post(CHAT, json=body(PROMPT, max_tokens=2)).json()
    assert data["choices"][0]["logprobs"] is None


def test_endpoint_scores_equal_white_box(endpoint, white, queries):
    assert endpoint.scoring == "exact"  # the server offers prompt_logprobs
    got, want = endpoint.score(queries), white.score(queries)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=TOL)


def test_first_token_scores_equal_white_box_on_one_token_answers(url, white, queries):
    # With at most 20 tokens, top_logprobs=20 lists every one: first-token scores are exact here.
    adapter = EndpointAdapter(url, retries=2, timeout=60, scoring="first_token")
    got, want = adapter.score(queries), white.score(queries)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=TOL)


def test_endpoint_generate_equals_white_box(endpoint, white, queries):
    # One query at a time on the white box: its generate cannot batch image with text-only queries.
    assert endpoint.generate(queries, max_new_tokens=5) == [white.generate([q], max_new_tokens=5)[0] for q in queries]


# ---------------------------------------------------------------------- 4: batching
def varied_bodies(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append(body(prompt, picture(100 + i) if i % 2 else None, max_tokens=4, logprobs=True, top_logprobs=3))
    return out


def test_batched_generation_equals_alone(white):
    # Directly at model level: left padding in a batch must not change tokens or log-probs.
    qs = [Query(" ".join(WORDS[: k + 1]), picture(k), ()) for k in range(6)]
    batch = generate_steps(white, qs, max_new_tokens=4, top_k=3)
    for q, b in zip(qs, batch):
        a = generate_steps(white, [q], max_new_tokens=4, top_k=3)[0]
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert [t["token"] for t in a["tokens"]] == [t["token"] for t in b["tokens"]]
        assert np.allclose([t["logprob"] for t in a["tokens"]], [t["logprob"] for t in b["tokens"]], atol=TOL)


def test_concurrent_requests_equal_alone(client):
    bodies = varied_bodies()
    alone = [client.post(CHAT, json=b).json() for b in bodies]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(lambda b: client.post(CHAT, json=b), bodies))
    for a, resp in zip(alone, together):
        assert resp.status_code == 200, resp.text
        ca, cb = a["choices"][0], resp.json()["choices"][0]
        assert ca["message"]["content"] == cb["message"]["content"]
        assert ca["finish_reason"] == cb["finish_reason"]
        assert_same_steps(ca["logprobs"]["content"], cb["logprobs"]["content"])


# ---------------------------------------------------------------------- 5: malformed requests
def malformed_cases(refuse_url: str) -> dict[str, tuple[bytes, int]]:
    def js(obj) -> bytes:
        return json.dumps(obj).encode()

    def with_image(url: str) -> bytes:
        return js({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": PROMPT}]}]})

    return {
        "not json": (b"{not json", 400),
        "not utf-8": (b"\xff\xfe\x00", 400),
        "json list": (b"[]", 400),
        "no messages": (js({"model": "tiny"}), 400),
        "unknown part": (js({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}), 400),
        "http image url": (with_image(refuse_url), 400),
        "invalid base64": (with_image("data:image/png;base64,@@not base64@@"), 400),
        "not an image": (with_image(data_url(b"just some bytes, not a picture")), 400),
        "too many pixels": (with_image(data_url(png_header(5000))), 413),
        "pixel bomb": (with_image(data_url(png_header(100_000))), 413),  # PIL itself refuses to open it
        "truncated image": (with_image(data_url(png_header(64))), 400),
        "max_tokens 0": (js(body(PROMPT, max_tokens=0)), 400),
        "max_tokens 10000": (js(body(PROMPT, max_tokens=10_000)), 400),
        "top_logprobs 50": (js(body(PROMPT, logprobs=True, top_logprobs=50)), 400),
        "top_logprobs without logprobs": (js(body(PROMPT, top_logprobs=5)), 400),
        "streaming": (js(body(PROMPT, stream=True)), 400),
        "body too large": (b" " * (Limits().max_body_bytes + 1), 413),
        "both prompt flags": (js(body(PROMPT, add_generation_prompt=True, continue_final_message=True)), 400),
        "neither prompt flag": (js(body(PROMPT, add_generation_prompt=False)), 400),
        "continue without assistant": (js(body(PROMPT, add_generation_prompt=False, continue_final_message=True)),
                                       400),
        "prompt_logprobs with max_tokens 4": (js(body(PROMPT, prompt_logprobs=0, max_tokens=4)), 400),
        "prompt_logprobs 99": (js(body(PROMPT, prompt_logprobs=99)), 400),
    }


def malformed_completions() -> dict[str, tuple[dict, int]]:
    return {
        "prompt list": ({"prompt": [PROMPT, PROMPT]}, 400),
        "token ids": ({"prompt": [1, 2, 3]}, 400),
        "empty prompt": ({"prompt": ""}, 400),
        "max_tokens 5": ({"prompt": PROMPT, "max_tokens": 5}, 400),
        "logprobs 50": ({"prompt": PROMPT, "logprobs": 50}, 400),
        "echo not a bool": ({"prompt": PROMPT, "echo": "yes"}, 400),
    }


def test_malformed_requests_get_json_4xx_and_server_keeps_serving(client):
    with canned(200, b"\x89PNG", "image/png") as (bait, hits):
        for name, (raw, status) in malformed_cases(f"{bait}/cat.png").items():
            resp = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
            assert resp.status_code == status, (name, resp.text)
            error = resp.json()["error"]
            assert isinstance(error, dict) and error["message"], name
            assert client.get("/health").status_code == 200, name
        assert hits == []  # the http:// image was refused, never fetched
    for name, (payload, status) in malformed_completions().items():
        resp = client.post("/v1/completions", json=payload)
        assert resp.status_code == status and resp.json()["error"]["message"], (name, resp.text)
    ok = client.post(CHAT, json=body(PROMPT, picture(1), max_tokens=2))
    assert ok.status_code == 200


# ---------------------------------------------------------------------- 6, dual encoders
def test_serve_binds_localhost_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_serve_refuses_dual_encoder_and_urls(tmp_path):
    from reference_models.architectures import build_reference_model

    model, proc = build_reference_model(arch="clip", preset="tiny", words=WORDS, seed=0)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="only generative models"):
        serve(model_dir=str(tmp_path), port=1)
    with pytest.raises(InputError, match="local model folder"):
        serve(model_dir="http://127.0.0.1:1", port=1)


# ---------------------------------------------------------------------- 7: EndpointAdapter errors
def test_endpoint_nothing_listening():
    sock = free_socket()
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens on the port now
    with pytest.raises(InputError, match="after 2 attempts") as info:
        EndpointAdapter(dead, retries=2, timeout=2)
    assert dead in str(info.value)


def test_endpoint_retries_server_errors():
    with canned(500, b'{"error": {"message": "boom"}}') as (base, hits):
        with pytest.raises(InputError, match="HTTP 500 after 2 attempts") as info:
            EndpointAdapter(base, retries=2, timeout=2)
        assert len(hits) == 2 and base in str(info.value)


def test_endpoint_non_json_answer():
    with canned(200, b"<html>hello</html>", "text/html") as (base, hits):
        with pytest.raises(InputError, match="not JSON"):
            EndpointAdapter(base, retries=2, timeout=2)
        assert len(hits) == 1  # a malformed answer is not retried


def test_endpoint_client_error_is_not_retried():
    with canned(400, b'{"error": {"message": "bad"}}') as (base, hits):
        adapter = EndpointAdapter(base, model="m", retries=3, timeout=2, scoring="first_token")  # no probe
        with pytest.raises(InputError, match="HTTP 400"):
            adapter.score([Query(PROMPT, None, COLOURS)])
        assert len(hits) == 1


def test_endpoint_without_logprobs_is_refused():
    answer = {"choices": [{"message": {"content": "red"}, "logprobs": None}]}
    with canned(200, json.dumps(answer).encode()) as (base, _):
        adapter = EndpointAdapter(f"{base}/v1", model="m", retries=1, timeout=2)
        with pytest.raises(InputError, match="logprobs"):
            adapter.score([Query(PROMPT, None, COLOURS)])


# ---------------------------------------------------------------------- the batching loop itself
def request(prompt: str) -> ChatRequest:
    return ChatRequest(Query(prompt, None, ()), 1, 0, False)


def echo(requests):
    if any(r.query.prompt == "boom" for r in requests):
        raise RuntimeError("boom")
    return [{"text": r.query.prompt} for r in requests]


def test_batcher_survives_a_failing_request():
    async def main():
        batcher = _Batcher(echo, Limits())
        got = await asyncio.gather(*(batcher.submit(request(p)) for p in ("a", "boom", "c")), return_exceptions=True)
        assert got[0] == {"text": "a"} and got[2] == {"text": "c"}  # neighbours of the bad one still answered
        assert isinstance(got[1], RuntimeError)
        assert await batcher.submit(request("d")) == {"text": "d"}

    asyncio.run(main())


def test_batcher_survives_cancelled_requests():
    release, seen = threading.Event(), []

    def slow(requests):
        seen.extend(r.query.prompt for r in requests)
        release.wait(5)
        return [{"text": r.query.prompt} for r in requests]

    async def main():
        batcher = _Batcher(slow, Limits(batch_window_s=0.0))
        running_ = asyncio.create_task(batcher.submit(request("running")))
        while not seen:  # wait until "running" is inside generate
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(batcher.submit(request("waiting")))
        await asyncio.sleep(0.02)
        running_.cancel()
        waiting.cancel()
        later = asyncio.create_task(batcher.submit(request("later")))
        await asyncio.sleep(0.02)
        release.set()
        assert await asyncio.wait_for(later, 5) == {"text": "later"}
        assert "waiting" not in seen and not batcher.task.done()

    asyncio.run(main())


def test_generation_failure_is_a_json_500():
    # object() has no model: every generate call raises inside the batching loop.
    with running(create_app(adapter=object(), model_name="broken")) as base, \
            httpx.Client(base_url=base, timeout=10) as c:
        for _ in range(2):  # the second answer shows the loop outlived the first failure
            resp = c.post(CHAT, json=body(PROMPT))
            assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 200


def test_run_against_endpoint_writes_contract_outputs(url, small_data, tmp_path):
    """`mmaudit run --endpoint`: output-only probes run, white-box ones are skipped with a reason."""
    import json

    from audit.cli import main

    out = tmp_path / "run"
    argv = ["run", "--endpoint", url, "--data", str(small_data), "--suite", "standard", "--out", str(out),
            "--store", str(tmp_path / "s.duckdb"), "--max-examples", "6"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == 2 and summary["model"]["architecture"].startswith("endpoint:")
    probes = {m["probe"] for m in summary["metrics"]}
    assert {"modality_ablation", "hallucination"} <= probes
    skipped = [f for f in summary["findings"] if f["probe"] == "attention"]
    assert skipped and "white-box" in skipped[0]["message"]


# ---------------------------------------------------------------------- prompt log-probabilities (vLLM's scoring API)
def test_completions_echo_scores_equal_white_box(client, white):
    """/v1/completions with echo: the candidate's prompt log-probabilities sum to the white-box score."""
    cands = ("red blue", "red green", "blue red")  # several tokens each; the first two share their first
    q = Query(PROMPT, None, cands)
    want = white.score([q])[0]
    rendered = white.render_prompt(q)
    for cand, w in zip(cands, want):
        resp = client.post("/v1/completions", json={"model": "m", "prompt": f"{rendered} {cand}", "echo": True,
                                                    "logprobs": 1, "max_tokens": 0})
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        block = choice["logprobs"]
        assert choice["text"] == f"{rendered} {cand}" and block["token_logprobs"][0] is None
        assert len(block["tokens"]) == len(block["token_logprobs"]) == len(block["top_logprobs"])
        m = len(white.continuation_ids(cand))
        assert abs(sum(block["token_logprobs"][-m:]) - w) < TOL
    assert want[0] != want[1]  # the first token alone would tie them


def test_chat_prompt_logprobs_in_vllm_shape(client, white):
    q = Query(PROMPT, picture(2), ())
    resp = client.post(CHAT, json=body(q.prompt, q.image, prompt_logprobs=3, max_tokens=1, logprobs=True,
                                       top_logprobs=2))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    enc = white.encode([q])
    n = enc.context_lengths[0]
    ids = enc.input_ids[0, :n].tolist()
    plp = data["prompt_logprobs"]
    assert len(plp) == n == data["usage"]["prompt_tokens"] and plp[0] is None
    for t, entry in enumerate(plp[1:], start=1):
        assert int(next(iter(entry))) == ids[t]  # the prompt token itself is listed first
        assert 1 <= len(entry) <= 4 and all({"logprob", "rank", "decoded_token"} <= set(v) for v in entry.values())
        assert entry[str(ids[t])]["logprob"] <= 0 and entry[str(ids[t])]["rank"] >= 1
    assert data["choices"][0]["message"]["content"] == white.generate([q], max_new_tokens=1)[0]
    assert len(data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    plain = client.post(CHAT, json=body(PROMPT, max_tokens=1)).json()
    assert "prompt_logprobs" not in plain or plain["prompt_logprobs"] is None


# ---------------------------------------------------------------------- hardening
def test_context_length_is_refused_before_any_model_call(client, served, white):
    counting = served[1]
    context = white.model.config.text_config.max_position_embeddings
    overhead = white.encode([Query("red", None, ())]).context_lengths[0] - 1  # template tokens around one word
    too_long = " ".join(["red"] * (context + 5))
    before = len(counting.calls)
    refusals = [(CHAT, body(too_long, max_tokens=2)), (CHAT, body(too_long, picture(0))),
                (CHAT, body(too_long, prompt_logprobs=0)),
                (CHAT, {**body(PROMPT), "messages": [{"role": "user", "content": PROMPT},
                                                     {"role": "assistant", "content": too_long}],
                        "add_generation_prompt": False, "continue_final_message": True}),
                ("/v1/completions", {"prompt": too_long, "echo": True, "logprobs": 0, "max_tokens": 0})]
    fits = " ".join(["red"] * (context - 1 - overhead))  # exactly context - 1 prompt tokens
    refusals.append((CHAT, body(fits, max_tokens=2)))  # the prompt fits; prompt + max_tokens does not
    for path, payload in refusals:
        resp = client.post(path, json=payload)
        assert resp.status_code == 400 and "context" in resp.json()["error"]["message"], resp.text
    assert counting.calls[before:] == []
    assert client.post(CHAT, json=body(fits, max_tokens=1)).status_code == 200
    assert counting.calls[before:] == ["generate_detailed"]


def test_multi_megabyte_prompt_is_refused_without_a_model_call(client, served):
    counting = served[1]
    before = len(counting.calls)
    huge = "red " * (6 * 1024 * 1024 // 4)  # 6 MB: under the body cap, far over any context
    for path, payload in ((CHAT, body(huge)), ("/v1/completions", {"prompt": huge, "echo": True})):
        resp = client.post(path, json=payload)
        assert resp.status_code == 400 and "characters" in resp.json()["error"]["message"]
    assert counting.calls[before:] == []
    assert client.post(CHAT, json=body(PROMPT, max_tokens=1)).status_code == 200


def test_chunked_body_over_the_cap_is_413(client):
    def chunks():  # no Content-Length: the cap must hold while the body streams in
        for _ in range(Limits().max_body_bytes // (1024 * 1024) + 2):
            yield b" " * (1024 * 1024)

    resp = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert client.get("/health").status_code == 200


class Stuck:
    """A model far slower than the deadline: generate blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def generate_detailed(self, queries, *, max_new_tokens, top_k):
        self.release.wait(60)
        return [{"text": "", "tokens": [], "finish_reason": "stop"} for _ in queries]


def test_every_request_is_answered_within_its_deadline():
    stuck = Stuck()
    app = create_app(adapter=stuck, model_name="stuck", limits=Limits(request_timeout_s=1.0))
    try:
        with running(app) as base, httpx.Client(base_url=base, timeout=30) as c:
            started = time.monotonic()
            resp = c.post(CHAT, json=body(PROMPT))
            assert resp.status_code == 503 and "deadline" in resp.json()["error"]["message"]
            assert time.monotonic() - started < 25  # hang guard only
            host, port = base.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=25) as sock:  # a body that never arrives
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{")
                status_line = sock.recv(4096).split(b"\r\n")[0]
            assert b" 408 " in status_line
            assert c.get("/health").status_code == 200
    finally:
        stuck.release.set()


def test_sigterm_stops_the_server(model_dir):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "audit", "serve", "--model", str(model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 300  # hang guard: the server loads torch and the model first
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        # A client still sending its request: graceful shutdown must not wait for it.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=90)
        _, err = proc.communicate(timeout=10)
        assert rc in (0, -signal.SIGTERM), err.decode()[-2000:]
        assert b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("port", [0, 70000, -1, True])
def test_serve_port_outside_range_is_one_line(port, model_dir):
    with pytest.raises(InputError, match="--port") as info:  # checked before the model loads
        serve(model_dir=str(model_dir), port=port)
    assert "1-65535" in str(info.value) and "\n" not in str(info.value)


def test_cli_serve_bad_port_exits_2(model_dir, capsys):
    from audit.cli import main

    try:  # argparse may refuse it first (SystemExit) or serve() does (InputError -> 2)
        rc = main(["serve", "--model", str(model_dir), "--port", "70000"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert "--port" in capsys.readouterr().err.strip().splitlines()[-1]


def test_serve_warns_when_reachable_from_the_network(model_dir, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw))  # nothing is bound
    serve(model_dir=str(model_dir), host="0.0.0.0", port=8000)
    err = capsys.readouterr().err
    assert "warning" in err and "0.0.0.0" in err and "no authentication" in err
    assert seen[-1]["host"] == "0.0.0.0" and seen[-1]["timeout_graceful_shutdown"] > 0
    assert seen[-1]["limit_concurrency"] > 0
    serve(model_dir=str(model_dir), port=8000)
    assert "warning" not in capsys.readouterr().err and seen[-1]["host"] == "127.0.0.1"


def test_one_command_audits_a_vlmevalkit_pope_tsv_on_an_endpoint(url, tmp_path, monkeypatch):
    """`mmaudit run --data POPE.tsv --probes hallucination --endpoint URL` in one command:
    the TSV is imported once into the cache (reused on the next run), then audited."""
    import base64
    import csv
    import io
    import json

    from audit.cli import main

    monkeypatch.setenv("MMAUDIT_CACHE", str(tmp_path / "cache"))

    def b64(rgb):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    tsv = tmp_path / "POPE.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "image", "question", "answer", "category"])
        for i, (rgb, q, a, cat) in enumerate([((230, 40, 40), "is there a red circle in the image?", "yes", "random"),
                                              ((40, 80, 225), "is there a red circle in the image?", "no", "random"),
                                              ((40, 80, 225), "is there a blue square in the image?", "yes",
                                               "popular"),
                                              ((230, 40, 40), "is there a blue square in the image?", "no",
                                               "popular")]):
            w.writerow([str(i), b64(rgb), q, a.capitalize(), cat])
    for k in range(2):
        out = tmp_path / f"run{k}"
        argv = ["run", "--endpoint", url, "--data", str(tsv), "--probes", "hallucination", "--out", str(out),
                "--store", str(tmp_path / "s.duckdb")]
        assert main(argv) == 0
        s = json.loads((out / "summary.json").read_text())
        groups = {m["group"] for m in s["metrics"] if m["metric"] == "pope_accuracy"}
        assert groups == {None, "random", "popular"}
        assert s["data"]["n"] == 4
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1  # imported once, reused
