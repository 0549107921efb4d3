"""The black-box EndpointAdapter's hardening and scoring, generate mode and answer extraction.

Hostile servers are small local fakes (http.server, or raw sockets for byte-level
misbehaviour); known answers come from `mmaudit serve` over an untrained tiny LLaVA,
compared with the white-box adapter on the same folder. Deadline tests assert that the
call failed; the time they measure is only a hang guard.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import logging
import pickle
import socket
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import free_socket, picture, running  # noqa: E402

from audit.adapters import Query, load_adapter  # noqa: E402
from audit.adapters.base import Capabilities, ModelAdapter  # noqa: E402
from audit.adapters.endpoint import APPROXIMATE_NOTE, EXACT_NOTE, PROBE, EndpointAdapter  # noqa: E402
from audit.adapters.generate_mode import OTHER_SCORE, GenerateModeAdapter  # noqa: E402
from audit.answers import extract_choice, infer_option, infer_text, option_letters, pope_yes_no  # noqa: E402
from audit.errors import InputError  # noqa: E402
from reference_models.serve import create_app  # noqa: E402

KEY = "sk-test-7f3a9c1e5b"
QUERY = Query("what colour is the circle?", None, ("red", "blue"))
TOL = 1e-4


# ---------------------------------------------------------------------- fake servers
def chat_answer(*, logprob=-0.5, alt=-1.5, content="red", prompt_logprobs=None) -> dict:
    top = [{"token": "red", "logprob": logprob}, {"token": "blue", "logprob": alt}]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                           "logprobs": {"content": [{"token": "red", "logprob": logprob, "top_logprobs": top}]},
                           "finish_reason": "length"}]}
    if prompt_logprobs is not None:
        answer["prompt_logprobs"] = prompt_logprobs
    return answer


def models(*names: str) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}


def as_json(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity are written as the bare words, as a sloppy server would


@contextlib.contextmanager
def fake(route):
    """An HTTP server answering `route(request) -> (status, bytes[, headers])`; yields (url, seen requests)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                       "body": json.loads(raw) if raw else None}
            seen.append(request)
            status, payload, *extra = route(request)
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **(extra[0] if extra else {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def plain_chat(request):
    """A server with logprobs but without vLLM's prompt_logprobs."""
    if request["path"] == "/v1/models":
        return 200, as_json(models("m"))
    return 200, as_json(chat_answer())


@contextlib.contextmanager
def dripping(head: bytes, drip: bytes, *, interval: float = 0.4):
    """A raw TCP server: reads the request, sends `head`, then one byte of `drip` every `interval`
    seconds for a minute. Each read arrives well within any per-read timeout."""
    stop = threading.Event()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)

    def one(conn):
        with conn:
            try:
                conn.settimeout(2)
                conn.recv(1 << 20)
                conn.sendall(head)
                for i in range(int(60 / interval)):
                    if stop.wait(interval):
                        return
                    conn.sendall(drip[i % len(drip):i % len(drip) + 1])
            except OSError:
                return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()


# ---------------------------------------------------------------------- credentials
def test_api_key_is_sent_as_bearer_and_never_shown(caplog):
    def route(request):
        if request["headers"].get("Authorization") != f"Bearer {KEY}":
            return 401, as_json({"error": {"message": "no"}})
        return plain_chat(request)

    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at DEBUG
    with fake(route) as (url, seen):
        adapter = EndpointAdapter(url, api_key=KEY, api_key_env="MMAUDIT_TEST_KEY", retries=1, timeout=10)
        adapter.score([QUERY])
        adapter.generate([QUERY], max_new_tokens=2)
    assert seen and all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in seen)
    shown = " ".join([repr(adapter), str(vars(adapter)), repr(adapter.describe()), repr(adapter.capabilities),
                      caplog.text])
    assert KEY not in shown
    with pytest.raises(TypeError) as info:
        pickle.dumps(adapter)
    assert KEY not in str(info.value)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refusal_is_one_line_naming_the_variable(status):
    def route(request):  # a server that echoes the credential it got into its error
        return status, as_json({"error": {"message": f"invalid key {request['headers'].get('Authorization')}"}})

    with fake(route) as (url, seen):
        with pytest.raises(InputError) as info:
            EndpointAdapter(url, api_key=KEY, api_key_env="MY_AUDIT_KEY", retries=3, timeout=10)
        assert len(seen) == 1  # not retried
        with pytest.raises(InputError, match="none was sent") as without:
            EndpointAdapter(url, retries=1, timeout=10)
    message = str(info.value)
    assert f"HTTP {status}" in message and "MY_AUDIT_KEY" in message and KEY not in message
    assert "\n" not in message and "--api-key-env" in str(without.value)


def test_error_text_from_the_server_is_redacted():
    def route(request):
        if request["path"] == "/v1/models":
            return 200, as_json(models("m"))
        return 400, as_json({"error": {"message": f"bad request from {request['headers']['Authorization']}"}})

    with fake(route) as (url, _):
        adapter = EndpointAdapter(url, api_key=KEY, retries=1, timeout=10, scoring="first_token")
        with pytest.raises(InputError, match="HTTP 400") as info:
            adapter.score([QUERY])
    assert KEY not in str(info.value) and "***" in str(info.value)


def test_extra_headers_are_sent_and_checked():
    with fake(plain_chat) as (url, seen):
        EndpointAdapter(url, headers=["X-Audit-Team: safety", "X-Trace:42"], retries=1, timeout=10)
    assert seen[0]["headers"]["X-Audit-Team"] == "safety" and seen[0]["headers"]["X-Trace"] == "42"
    for bad in (["no colon here"], ["X-Bad\r\nInjected: 1"], ["X-Ok: a\nb"]):
        with pytest.raises(InputError, match="header"):
            EndpointAdapter("http://127.0.0.1:1", model="m", headers=bad, scoring="first_token")
    with pytest.raises(InputError, match="not both"):
        EndpointAdapter("http://127.0.0.1:1", model="m", api_key=KEY, headers=["Authorization: Bearer x"],
                        scoring="first_token")


# ---------------------------------------------------------------------- model discovery and URLs
def test_model_must_be_named_unless_exactly_one_is_served():
    for served, expect in ((("alpha", "beta"), r"serves 2 models \(alpha, beta\).*--endpoint-model"),
                           ((), "lists no model")):
        with fake(lambda r, served=served: (200, as_json(models(*served)))) as (url, _):
            with pytest.raises(InputError, match=expect):
                EndpointAdapter(url, retries=1, timeout=10)
    with fake(plain_chat) as (url, seen):
        assert EndpointAdapter(url, retries=1, timeout=10).model_name == "m"
        first = len(seen)
        EndpointAdapter(url, model="other", retries=1, timeout=10).score([QUERY])
    named = seen[first:]
    assert named and all(r["method"] == "POST" and r["body"]["model"] == "other" for r in named)  # no discovery


def test_unreachable_endpoints_fail_in_one_line():
    sock = free_socket()
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    cases = {closed: "connection failed", "http://127.0.0.1:99999": "outside 1-65535",
             "ftp://127.0.0.1/": "http:// or https://", "http://user:pw@127.0.0.1:8000": "credentials",
             "not a url at all": "http"}
    for url, expect in cases.items():
        with pytest.raises(InputError, match=expect) as info:
            EndpointAdapter(url, retries=1, timeout=5)
        assert "\n" not in str(info.value) and "pw@" not in str(info.value)


# ---------------------------------------------------------------------- deadlines and sizes
@pytest.mark.parametrize("head, drip", [
    (b"", b"HTTP/1.1 200 OK"),  # the status line itself, a byte at a time
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", b" "),  # the body
], ids=["headers", "body"])
def test_a_dripping_server_is_cut_off_by_the_total_deadline(head, drip):
    with dripping(head, drip) as url:
        adapter = EndpointAdapter(url, model="m", timeout=1.5, retries=1, scoring="first_token")
        for call in (lambda: adapter.score([QUERY]), lambda: adapter.generate([QUERY], max_new_tokens=2)):
            started = time.monotonic()
            with pytest.raises(InputError, match="deadline"):
                call()
            assert time.monotonic() - started < 30  # hang guard only: the server drips for a minute


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """256 MB of zeros, gzip-compressed to a few hundred KB."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join([*(z.compress(block) for _ in range(256)), z.flush()])


def test_a_gzip_bomb_is_refused_while_reading(gzip_bomb):
    with fake(lambda r: (200, gzip_bomb, {"Content-Encoding": "gzip"})) as (url, _):
        adapter = EndpointAdapter(url, model="m", retries=1, timeout=60, scoring="first_token")
        tracemalloc.start()
        try:
            with pytest.raises(InputError, match="exceeds"):
                adapter.score([QUERY])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(gzip_bomb) < 2 * 1024 * 1024 and peak < 128 * 1024 * 1024  # never expanded whole


def test_compressed_and_oversized_answers():
    good = zlib.compress(as_json(chat_answer()), wbits=16 + zlib.MAX_WBITS)
    with fake(lambda r: (200, good, {"Content-Encoding": "gzip"})) as (url, _):
        scores = EndpointAdapter(url, model="m", retries=1, timeout=10, scoring="first_token").score([QUERY])
    np.testing.assert_allclose(scores[0], [-0.5, -1.5])
    with fake(lambda r: (200, good, {"Content-Encoding": "br"})) as (url, _):
        with pytest.raises(InputError, match="not supported"):
            EndpointAdapter(url, model="m", retries=1, timeout=10, scoring="first_token").score([QUERY])
    padded = as_json({**chat_answer(), "padding": "x" * 200_000})
    with fake(lambda r: (200, padded)) as (url, _):
        small = EndpointAdapter(url, model="m", retries=1, timeout=10, scoring="first_token",
                                max_response_bytes=64 * 1024)
        with pytest.raises(InputError, match="limit|exceeds"):
            small.score([QUERY])


# ---------------------------------------------------------------------- fail closed on non-finite numbers
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "null": None}


@pytest.mark.parametrize("bad", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_non_finite_first_token_logprobs_are_refused(bad):
    with fake(lambda r: (200, as_json(chat_answer(alt=BAD_VALUES[bad])))) as (url, _):
        adapter = EndpointAdapter(url, model="m", retries=1, timeout=10, scoring="first_token")
        with pytest.raises(InputError, match="non-finite or missing") as info:
            adapter.score([QUERY])
    assert url in str(info.value) and QUERY.prompt in str(info.value)


@pytest.mark.parametrize("bad", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_non_finite_prompt_logprobs_are_refused(bad):
    def route(request):
        if request["body"]["messages"][0]["content"][-1]["text"] == PROBE.prompt:  # the probe gets good numbers
            entries = [None, {"5": {"logprob": -1.0}}, {"6": {"logprob": -2.0}}]
        else:
            entries = [None, {"5": {"logprob": -1.0}}, {"7": {"logprob": BAD_VALUES[bad]}}]
        if request["body"].get("add_generation_prompt"):
            entries = entries[:2]  # the context alone: the candidate adds the last position
        return 200, as_json(chat_answer(prompt_logprobs=entries))

    with fake(route) as (url, _):
        adapter = EndpointAdapter(url, model="m", retries=1, timeout=10)
        assert adapter.scoring == "exact"
        with pytest.raises(InputError, match="non-finite or missing") as info:
            adapter.score([QUERY])
    assert QUERY.prompt in str(info.value)


# ---------------------------------------------------------------------- the capability probe
def test_without_prompt_logprobs_scores_are_approximate_and_say_so():
    def refusing(request):
        if request["body"] and "prompt_logprobs" in request["body"]:
            return 400, as_json({"error": {"message": "extra fields not permitted"}})
        return plain_chat(request)

    for route in (refusing, plain_chat):  # refused outright, or silently ignored
        with fake(route) as (url, _):
            adapter = EndpointAdapter(url, model="m", retries=1, timeout=10)
            assert adapter.scoring == "first_token" and APPROXIMATE_NOTE in adapter.capabilities.notes
            assert adapter.describe()["scoring"] == "first_token"
            with pytest.raises(InputError, match="exact scoring is impossible"):
                EndpointAdapter(url, model="m", retries=1, timeout=10, scoring="exact")


def test_a_wrong_model_name_is_not_mistaken_for_a_missing_feature():
    with fake(lambda r: (404, as_json({"error": {"message": "model 'nope' does not exist"}}))) as (url, _):
        with pytest.raises(InputError, match="HTTP 404.*does not exist"):
            EndpointAdapter(url, model="nope", retries=1, timeout=10)


# ---------------------------------------------------------------------- against `mmaudit serve`
CANDIDATES = ("red circle", "red square", "blue circle")  # several tokens; the first two share a first token


@pytest.fixture(scope="module")
def white(untrained_llava):
    return load_adapter(untrained_llava)


@pytest.fixture(scope="module")
def url(untrained_llava):
    with running(create_app(adapter=load_adapter(untrained_llava), model_name="llava-untrained")) as base:
        yield base


@pytest.fixture(scope="module")
def exact(url):
    adapter = EndpointAdapter(url, retries=2, timeout=120, concurrency=3)
    yield adapter
    adapter.close()


def shape_queries() -> list[Query]:
    prompt = "is there a red circle in the image?"
    return [Query(prompt, picture(s), CANDIDATES) for s in range(3)] + [Query(prompt, None, CANDIDATES)]


def test_exact_scores_equal_white_box_on_candidates_sharing_a_first_token(exact, white):
    assert exact.scoring == "exact" and EXACT_NOTE in exact.capabilities.notes
    queries = shape_queries()
    got, want = exact.score(queries), white.score(queries)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=TOL)
        assert abs(w[0] - w[1]) > 10 * TOL  # the white box tells them apart...
    approx = EndpointAdapter(exact.base, retries=2, timeout=120, scoring="first_token")
    assert APPROXIMATE_NOTE in approx.capabilities.notes
    for s in approx.score(queries):
        assert s[0] == s[1]  # ...first-token scoring cannot


def test_generate_mode_reads_yes_no_answers_through_the_server(exact, white):
    questions = [Query(f"is there a {c} {s} in the image?", picture(i), ("yes", "no") if i % 2 else ("no", "yes"))
                 for i, (c, s) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                             ("yellow", "circle"), ("red", "square"), ("blue", "triangle")])]
    mode = GenerateModeAdapter(exact, max_new_tokens=6)
    got = mode.score(questions, batch_size=4)
    answers = [white.generate([q], max_new_tokens=6)[0] for q in questions]
    failures = 0
    for q, answer, s in zip(questions, answers, got):
        said = pope_yes_no(answer)
        if said is None:
            failures += 1
            assert list(s) == [0.0, 0.0]
        else:
            expect = np.full(2, OTHER_SCORE)
            expect[list(q.candidates).index(said)] = 0.0
            assert list(s) == list(expect), answer
    assert mode.answers_read == len(questions) and mode.parse_failures == failures
    assert not mode.capabilities.white_box and mode.describe()["score_mode"] == "generate"
    # The same wrapper over the white box reads the same answers.
    assert [list(s) for s in GenerateModeAdapter(white, max_new_tokens=6).score(questions)] == [list(s) for s in got]


def test_hallucination_probe_runs_in_generate_mode_against_the_server(exact, white, small_data):
    from audit.dataset import Dataset
    from probes.hallucination import Hallucination

    data = Dataset.load(small_data).audit_split()
    mode = GenerateModeAdapter(exact, max_new_tokens=6)
    probe = Hallucination(batch_size=4)
    plan = probe.plan(mode, data, max_examples=8)
    assert not plan.skipped and plan.units
    rows = [probe.run(mode, unit, seed=0) for unit in plan.units]
    n = 0
    for unit, frame in zip(plan.units, rows):
        images = unit.dataset()
        for e in unit.examples:
            answer = white.generate([Query(e.prompt, images.image(e), ())], max_new_tokens=6)[0]
            pred = frame[(frame.example_id == e.id) & (frame.metric == "pred_yes")].value.item()
            assert pred == float(pope_yes_no(answer) == "yes"), answer
            n += 1
    assert mode.answers_read == n > 0


# ---------------------------------------------------------------------- generate mode, unit level
class Canned(ModelAdapter):
    """Answers from a table; records each generate batch (image and text-only never mixed)."""

    architecture = "canned"
    capabilities = Capabilities(kind="generative", white_box=False)

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.batches = answers, []

    def score(self, queries, *, batch_size=16):
        raise AssertionError("generate mode must not call score")

    def generate(self, queries, *, max_new_tokens=8):
        self.batches.append([q.image is not None for q in queries])
        return [self.answers[q.prompt] for q in queries]


def test_generate_mode_scores_are_indicators_and_failures_are_counted():
    inner = Canned({"a": "Yes, there is.", "b": "B", "c": "", "d": "I would rather not say which colour"})
    queries = [Query("a", picture(0), ("yes", "no")), Query("b", None, ("A", "B", "C")),
               Query("c", picture(1), ("yes", "no")), Query("d", None, ("red", "blue"))]
    mode = GenerateModeAdapter(inner, max_new_tokens=4)
    got = mode.score(queries, batch_size=2)
    assert [list(s) for s in got] == [[0.0, OTHER_SCORE], [OTHER_SCORE, 0.0, OTHER_SCORE], [0.0, 0.0], [0.0, 0.0]]
    assert (mode.answers_read, mode.parse_failures) == (4, 2)
    assert all(len(set(b)) == 1 for b in inner.batches)
    probs = ModelAdapter.choice_distribution(got[1])
    assert probs[1] == 1.0 and probs.sum() == 1.0
    with pytest.raises(InputError, match="generative"):
        GenerateModeAdapter(type("Dual", (Canned,), {"capabilities": Capabilities(kind="dual_encoder",
                                                                                   white_box=True)})({}))


# ---------------------------------------------------------------------- answer extraction tables
@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a red circle in the image.", "yes"),
    ("No", "no"), ("No.", "no"), ("no, there is not.", "no"), ("NO", "no"),
    ("There is no red circle in the image.", "no"), ("The image does not show a circle.", "no"),
    ("Not that I can see.", "no"), ("No\nThere is only a square.", "no"),
    ("There is a circle. It is not red.", "yes"),  # only the first sentence counts
    ("No!", "yes"), ("Nope", "yes"), ("I cannot see one", "yes"),  # POPE's own quirks, kept for comparability
    ("", None), ("   ", None), (".", None),
])
def test_pope_yes_no(answer, expected):
    assert pope_yes_no(answer) == expected


MC_PROMPT = "Which colour is the circle?\nA. red\nB. green\nC. blue\nAnswer with the option's letter."


@pytest.mark.parametrize("answer, expected", [
    ("A", 0), ("B.", 1), ("(C)", 2), ("Answer: B", 1), ("The answer is (C).", 2), ("**B**", 1),
    ("C. blue", 2), ("B) green", 1), ("[A]", 0), ("Answer:C", 2),
    ("green", 1), ("It is blue.", 2),  # the option's text, when no letter stands alone
    ("A green circle is shown.", 1),  # a leading "A" in a longer answer is the article: the text decides
    ("A or B", None), ("red or green", None), ("purple", None), ("", None),
    ("b", None),  # letters are capitals, as upstream
])
def test_lettered_choices(answer, expected):
    assert extract_choice(answer, ("red", "green", "blue"), prompt=MC_PROMPT) == expected


@pytest.mark.parametrize("answer, expected", [
    ("red", 0), ("Red.", 0), ("The shapes are blue", 2), ("green!", 1),
    ("reddish", None),  # whole words only
    ("red and blue", None), ("It is definitely, without any doubt at all, the colour blue", None),  # too long
    ("A", None),  # no letters were given to the options
])
def test_unlettered_choices(answer, expected):
    assert extract_choice(answer, ("red", "green", "blue"), prompt="what colour are the shapes?") == expected


def test_option_letters_and_rules():
    assert option_letters(MC_PROMPT, ("red", "green", "blue")) == ("A", "B", "C")
    assert option_letters("(A) Green (B) red", ("red", "green")) == ("B", "A")  # order from the prompt
    assert option_letters("pick one: red, green", ("red", "green")) is None
    assert option_letters("", ("A", "B", "C", "D")) == ("A", "B", "C", "D")
    assert extract_choice("The answer is D", ("A", "B", "C", "D")) == 3
    assert extract_choice("no idea", ("A", "B", "C", "D")) is None
    assert infer_option("A and also B", ("A", "B")) is None
    assert infer_text("yellow", ("yellow", "yellow green")) == 0
