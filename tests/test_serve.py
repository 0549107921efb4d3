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
import socket
import struct
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


@pytest.fixture(scope="module")
def url(model_dir):
    with running(create_app(adapter=load_adapter(model_dir), model_name="tiny-llava")) as base:
        yield base


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
    got, want = endpoint.score(queries), white.score(queries)
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
        adapter = EndpointAdapter(base, model="m", retries=3, timeout=2)
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


def echo(queries, *, max_new_tokens, top_k):
    if any(q.prompt == "boom" for q in queries):
        raise RuntimeError("boom")
    return [{"text": q.prompt} for q in queries]


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

    def slow(queries, *, max_new_tokens, top_k):
        seen.extend(q.prompt for q in queries)
        release.wait(5)
        return [{"text": q.prompt} for q in queries]

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
