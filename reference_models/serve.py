"""`mmaudit serve`: an OpenAI-compatible server for a local MODEL_DIR (the known-answer endpoint).

The API shape vLLM serves production models with, so the black-box adapter is tested
against it:

- `POST /v1/chat/completions`: images as `data:` URLs only (never fetched from the
  network), `logprobs`/`top_logprobs`; only the last user message is read. vLLM's scoring
  extensions: `prompt_logprobs: k` (a top-level list, one dict per prompt token after the
  first, the token itself listed first) and `continue_final_message: true` with
  `add_generation_prompt: false` (the last message is an open assistant message whose text
  is tokenised as a continuation, the lm-eval way: the same ids the white-box `score`
  appends). Such scoring requests generate at most one token.
- `POST /v1/completions`: a raw text prompt (no chat template, no image) with `echo` and
  `logprobs: k` (prompt token log-probabilities when echoing), `max_tokens` 0 or 1.
- `GET /v1/models`, `GET /health`.

Decoding is greedy (`temperature` is accepted and ignored); streaming is not supported.
Generation requests that arrive together are batched into one generate call; results do
not depend on the batch (left padding, checked to 1e-4 by the tests). One worker thread
runs every model call in turn (the adapter is not thread-safe).

Limits: bodies over `max_body_bytes` get 413 before parsing; a prompt longer than
`max_chars_per_token` characters per context token is refused before tokenising, and one
whose tokens plus `max_tokens` exceed the model's context length (config
`max_position_embeddings`, the text config's first) gets 400 before any forward pass;
every request is answered or refused within `request_timeout_s` (408 while its body is
still arriving, 503 while it waits for the model). Malformed input gets a 4xx JSON error;
the server never crashes on it. SIGTERM stops it once open requests finish, after at most
`shutdown_grace_s` (plus a model call already running, itself bounded by `max_new_tokens`).
Bound to 127.0.0.1 unless told otherwise; another host gets a warning on stderr.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` class on the
# handler, and fastapi is imported lazily (an optional extra), not at module level.
import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from audit.adapters.base import Query
from audit.errors import InputError

__all__ = ["ChatRequest", "Limits", "context_length", "create_app", "decode_image", "generate_steps",
           "load_generative", "parse_completion", "parse_request", "run_requests", "score_prompt", "serve"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same value


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    max_new_tokens: int = 64
    max_top_logprobs: int = 20
    max_batch: int = 16
    batch_window_s: float = 0.005
    request_timeout_s: float = 120.0
    max_chars_per_token: int = 16  # no tokenizer packs more characters per token into natural text
    shutdown_grace_s: int = 5
    max_connections: int = 256  # beyond this uvicorn answers 503 at once


@dataclass(frozen=True)
class ChatRequest:
    query: Query
    max_tokens: int
    top_logprobs: int
    logprobs: bool
    prompt_logprobs: int | None = None  # vLLM extension: k alternatives per prompt token
    continuation: str | None = None  # continue_final_message: the open assistant message
    raw: bool = False  # /v1/completions: query.prompt is the model's whole input
    echo: bool = False

    @property
    def scoring(self) -> bool:
        """Answered from one forward pass (prompt log-probabilities, at most one new token)."""
        return self.raw or self.prompt_logprobs is not None or self.continuation is not None


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- request parsing
def decode_image(url: str, *, limits: Limits) -> Image.Image:
    """An RGB image from a `data:image/...;base64,` URL; anything else is refused, never fetched."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise BadRequest("image_url must be a data:image/...;base64 URL (remote URLs are not fetched)")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadRequest("image_url must be a data:image/...;base64 URL")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest("image_url is not valid base64 data") from None
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only: size is checked before decoding
    except Image.DecompressionBombError:
        raise BadRequest(f"image exceeds {limits.max_image_pixels} pixels", 413) from None
    except Exception as exc:  # PIL raises many types on data that is not an image
        raise BadRequest(f"image could not be decoded ({type(exc).__name__})") from None
    if img.width * img.height > limits.max_image_pixels:
        raise BadRequest(f"image of {img.width}x{img.height} exceeds {limits.max_image_pixels} pixels", 413)
    if img.format not in IMAGE_FORMATS:
        raise BadRequest(f"image format {img.format} is not PNG, JPEG or WebP")
    try:
        return img.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data surfaces only on decoding
        raise BadRequest(f"image could not be decoded ({type(exc).__name__})") from None


def _content(content, *, limits: Limits) -> tuple[str, Image.Image | None]:
    """Prompt text and optional image of one message's `content`."""
    if isinstance(content, str):
        return content.strip(), None
    if not isinstance(content, list):
        raise BadRequest("message 'content' must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(decode_image(part["image_url"].get("url"), limits=limits))
        elif kind in ("text", "image_url"):
            raise BadRequest(f"content part {kind!r} is malformed")
        else:
            raise BadRequest(f"unsupported content part type {kind!r}")
    if len(images) > 1:
        raise BadRequest("at most one image per request is supported")
    return " ".join(texts).strip(), (images[0] if images else None)


def _bounded_int(value, *, name: str, low: int, high: int) -> int:
    # bool is an int subclass; `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name!r} must be an integer in [{low}, {high}]")
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name!r} must be a boolean")
    return value


def _generation_options(body: dict, *, limits: Limits, scoring: bool) -> tuple[int, int, bool]:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = 1 if scoring else min(16, limits.max_new_tokens)
    if scoring and max_tokens != 1:
        raise BadRequest("prompt_logprobs and continue_final_message requests generate exactly 1 token here "
                         "('max_tokens': 1)")
    max_tokens = _bounded_int(max_tokens, name="max_tokens", low=1, high=limits.max_new_tokens)
    logprobs = _flag(body, "logprobs", False)
    top = body.get("top_logprobs")
    top = 0 if top is None else _bounded_int(top, name="top_logprobs", low=0, high=limits.max_top_logprobs)
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    return max_tokens, top, logprobs


def _check_unsupported(body: dict) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise BadRequest("'temperature' must be a number >= 0")
    if body.get("stream"):
        raise BadRequest("streaming is not supported")
    if body.get("n") not in (None, 1):
        raise BadRequest("only 'n': 1 is supported")


def _check_chars(text: str, *, limits: Limits, context: int | None) -> None:
    # Before tokenising: a multi-megabyte prompt must not occupy the model's worker thread.
    if context and len(text) > context * limits.max_chars_per_token:
        raise BadRequest(f"the prompt has {len(text)} characters, more than a {context}-token context can hold "
                         f"({limits.max_chars_per_token} characters a token); shorten it")


def parse_request(body, *, limits: Limits, context: int | None = None) -> ChatRequest:
    """A validated request from an OpenAI chat-completions body; BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    _check_unsupported(body)
    add_generation = _flag(body, "add_generation_prompt", True)
    continuing = _flag(body, "continue_final_message", False)
    if add_generation == continuing:
        raise BadRequest("set exactly one of 'add_generation_prompt' and 'continue_final_message'")
    continuation = None
    if continuing:
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise BadRequest("'continue_final_message' needs an assistant message last")
        continuation, image = _content(last.get("content"), limits=limits)
        if image is not None or not continuation:
            raise BadRequest("the final assistant message must be non-empty text")
        messages = messages[:-1]
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise BadRequest("'messages' has no user message")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:
        prompt_logprobs = _bounded_int(prompt_logprobs, name="prompt_logprobs", low=0, high=limits.max_top_logprobs)
    max_tokens, top, logprobs = _generation_options(body, limits=limits,
                                                    scoring=continuing or prompt_logprobs is not None)
    prompt, image = _content(user[-1].get("content"), limits=limits)
    _check_chars(prompt + (continuation or ""), limits=limits, context=context)
    return ChatRequest(Query(prompt, image, ()), max_tokens, top, logprobs, prompt_logprobs=prompt_logprobs,
                       continuation=continuation)


def parse_completion(body, *, limits: Limits, context: int | None = None) -> ChatRequest:
    """A validated /v1/completions body: one text prompt, scored (echo + logprobs) or continued by one token."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be one non-empty string (lists and token ids are not supported)")
    _check_unsupported(body)
    _check_chars(prompt, limits=limits, context=context)
    echo = _flag(body, "echo", False)
    top = body.get("logprobs")
    top = None if top is None else _bounded_int(top, name="logprobs", low=0, high=limits.max_top_logprobs)
    max_tokens = body.get("max_tokens", 1)
    if isinstance(max_tokens, bool) or max_tokens not in (0, 1):
        raise BadRequest("this server's /v1/completions scores prompts: 'max_tokens' must be 0 or 1 "
                         "(generate with /v1/chat/completions)")
    return ChatRequest(Query(prompt, None, ()), max_tokens, top or 0, top is not None, raw=True, echo=echo)


# ---------------------------------------------------------------------- model calls (worker thread)
def context_length(adapter) -> int | None:
    """The model's context length in tokens (config `max_position_embeddings`), or None."""
    config = getattr(getattr(adapter, "model", None), "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def _check_length(n_prompt: int, more: int, context: int | None) -> None:
    if context and n_prompt + more > context:
        raise BadRequest(f"this model's maximum context length is {context} tokens; the request has {n_prompt} "
                         f"prompt tokens and asks for {more} more; shorten the prompt or lower max_tokens")


def generate_steps(adapter, queries: Sequence[Query], *, max_new_tokens: int, top_k: int) -> list[dict]:
    """The adapter's greedy generation, stop step included: an OpenAI server reports the
    end-of-sequence token with its log-probability (vLLM does), so a model whose likeliest
    first token is EOS still gives the black-box adapter first-position `top_logprobs`."""
    return adapter.generate_detailed(queries, max_new_tokens=max_new_tokens, top_k=top_k)


def _encode(adapter, request: ChatRequest):
    import torch

    from audit.adapters.base import Encoded

    if not request.raw:
        try:  # the adapter refuses what does not fit or does not tokenize: the request's fault
            cont = None if request.continuation is None else [adapter.continuation_ids(request.continuation)]
            return adapter.encode([request.query], cont)
        except InputError as exc:
            raise BadRequest(str(exc)) from None
    text, bos = request.query.prompt, adapter.tokenizer.bos_token
    # Like the white box: no second BOS when the text (a rendered template) starts with one.
    ids = adapter.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if not ids:
        raise BadRequest("the prompt tokenizes to nothing")
    t = torch.tensor([ids], device=adapter.device)
    return Encoded(inputs={"input_ids": t, "attention_mask": torch.ones_like(t)}, context_lengths=[len(ids)],
                   continuations=[[]])


def _decode(adapter, tid: int) -> str:
    return adapter.tokenizer.decode([tid])


def _alternatives(adapter, row, k: int) -> list[tuple[int, str, float]]:
    if not k:
        return []
    vals, idx = row.topk(min(k, row.numel()))
    return [(int(i), _decode(adapter, int(i)), max(float(v), LOGPROB_FLOOR)) for v, i in zip(vals, idx)]


def score_prompt(adapter, request: ChatRequest, *, context: int | None) -> dict:
    """One forward pass: every prompt token's log-probability (with rank and k alternatives)
    and, when `max_tokens` is 1, the greedy next token. Refused before the forward pass when
    the prompt does not fit the context."""
    import torch

    enc = _encode(adapter, request)
    n = enc.context_lengths[0] + len(enc.continuations[0])
    _check_length(n, request.max_tokens, context)
    with torch.no_grad():
        lp = torch.log_softmax(adapter.forward(enc).logits[0, :n].float(), dim=-1)
    if torch.isnan(lp).any():
        raise RuntimeError("the model produced NaN log-probabilities")
    ids = [int(i) for i in enc.input_ids[0, :n].tolist()]
    k = request.top_logprobs if request.raw else (request.prompt_logprobs or 0)
    positions = []
    for t in range(1, n):
        row, tid = lp[t - 1], ids[t]
        positions.append({"id": tid, "token": _decode(adapter, tid), "logprob": max(float(row[tid]), LOGPROB_FLOOR),
                          "rank": 1 + int((row > row[tid]).sum()), "top": _alternatives(adapter, row, k)})
    steps, text, finish = [], "", "length"
    if request.max_tokens:
        row = lp[n - 1]
        tid = int(row.argmax())
        top = [(s, v) for _, s, v in _alternatives(adapter, row, request.top_logprobs)]
        steps.append({"token": _decode(adapter, tid), "logprob": max(float(row[tid]), LOGPROB_FLOOR), "top": top})
        if tid in (adapter.tokenizer.eos_token_id, adapter.tokenizer.pad_token_id):
            finish = "stop"
        else:
            text = _decode(adapter, tid) if request.raw else adapter.tokenizer.decode([tid], skip_special_tokens=True)
            text = text if request.raw else text.strip()
    return {"text": text, "tokens": steps, "finish_reason": finish, "prompt_tokens": n,
            "first_token": _decode(adapter, ids[0]), "prompt": positions}


def run_requests(adapter, requests: Sequence[ChatRequest], *, context: int | None) -> list:
    """Results (or the exception each request gets) for one group from the batcher."""
    out: list = [None] * len(requests)
    if requests[0].scoring:  # grouped alone: one forward pass each
        for i, r in enumerate(requests):
            try:
                out[i] = score_prompt(adapter, r, context=context)
            except BadRequest as exc:
                out[i] = exc
        return out
    first = requests[0]
    keep = list(range(len(requests)))
    if context:  # count each prompt's tokens (images expanded) before any forward pass
        for i, r in enumerate(requests):
            try:
                _check_length(_encode(adapter, r).context_lengths[0], first.max_tokens, context)
            except BadRequest as exc:
                out[i] = exc
        keep = [i for i in keep if out[i] is None]
    if keep:
        results = generate_steps(adapter, [requests[i].query for i in keep], max_new_tokens=first.max_tokens,
                                 top_k=first.top_logprobs)
        if len(results) != len(keep):
            raise RuntimeError(f"generate returned {len(results)} results for {len(keep)} queries")
        for i, result in zip(keep, results):
            out[i] = result
    return out


# ---------------------------------------------------------------------- batching
def _group_key(request: ChatRequest) -> tuple:
    if request.scoring:
        return ("score", id(request))
    # Processors need one image layout per call, generate one length and one top-k.
    return ("generate", request.query.image is not None, request.max_tokens, request.top_logprobs)


class _Batcher:
    """Collects requests arriving within a short window and runs each group in one call.

    `work(requests) -> results` (one result or exception per request) runs in a worker
    thread, one call at a time (the adapter is not thread-safe). The loop outlives failing
    and cancelled requests.
    """

    def __init__(self, work: Callable[[list], list], limits: Limits) -> None:
        self.work, self.limits = work, limits
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None  # held so the task is not garbage-collected

    async def submit(self, request: ChatRequest) -> dict:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # queues and tasks belong to one event loop (an app may be served again)
            self.loop, self.queue, self.task = loop, asyncio.Queue(), None
        if self.task is None or self.task.done():  # (re)start: a dead loop must not hang requests
            self.task = loop.create_task(self._loop())
        fut = loop.create_future()
        self.queue.put_nowait((request, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            groups: dict[tuple, list] = {}
            for item in await self._collect():
                groups.setdefault(_group_key(item[0]), []).append(item)
            for group in groups.values():
                await self._run(group)

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        await asyncio.sleep(self.limits.batch_window_s)
        while not self.queue.empty() and len(items) < self.limits.max_batch:
            items.append(self.queue.get_nowait())
        return [it for it in items if not it[1].done()]  # skip requests cancelled (or timed out) while waiting

    async def _run(self, group: list) -> None:
        group = [it for it in group if not it[1].done()]
        if not group:
            return
        try:
            results = await asyncio.to_thread(self.work, [r for r, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"work returned {len(results)} results for {len(group)} requests")
        except Exception as exc:
            if len(group) > 1:  # retry alone, so one bad request does not fail its neighbours
                for item in group:
                    await self._run([item])
                return
            _settle(group[0][1], exc=exc)
            return
        for (_, fut), result in zip(group, results):
            if isinstance(result, BaseException):
                _settle(fut, exc=result)
            else:
                _settle(fut, result=result)


def _settle(fut: asyncio.Future, *, result=None, exc: BaseException | None = None) -> None:
    if fut.done():  # the client went away (cancelled) while its request was generated
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# ---------------------------------------------------------------------- HTTP
def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


async def _read_body(request, *, limit: int) -> bytes | None:
    """The body, or None once it exceeds `limit` bytes (never buffers more than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("request body is not valid JSON") from None


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _usage(result: dict) -> dict:
    used = {"prompt_tokens": result.get("prompt_tokens", 0), "completion_tokens": len(result["tokens"])}
    return {**used, "total_tokens": used["prompt_tokens"] + used["completion_tokens"]}


def _vllm_prompt_logprobs(result: dict) -> list:
    """vLLM's shape: None for the first token, then {token id: {logprob, rank, decoded_token}},
    the prompt token first and its k alternatives after it."""
    out: list = [None]
    for p in result["prompt"]:
        entry = {str(p["id"]): {"logprob": p["logprob"], "rank": p["rank"], "decoded_token": p["token"]}}
        for rank, (tid, token, logprob) in enumerate(p["top"], start=1):
            entry.setdefault(str(tid), {"logprob": logprob, "rank": rank, "decoded_token": token})
        out.append(entry)
    return out


def _completion(result: dict, request: ChatRequest, *, model_name: str) -> dict:
    content = [{**_entry(t["token"], t["logprob"]), "top_logprobs": [_entry(s, lp) for s, lp in t["top"]]}
               for t in result["tokens"]]
    answer = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": {"content": content} if request.logprobs else None,
                     "finish_reason": result["finish_reason"]}],
        "usage": _usage(result),
    }
    if request.prompt_logprobs is not None:
        answer["prompt_logprobs"] = _vllm_prompt_logprobs(result)
    return answer


def _text_completion(result: dict, request: ChatRequest, *, model_name: str) -> dict:
    """The legacy completions shape; with `echo` the prompt's tokens come first (the first has no log-probability)."""
    tokens, logprobs, tops = [], [], []
    if request.echo:
        tokens.append(result["first_token"])
        logprobs.append(None)
        tops.append(None)
        for p in result["prompt"]:
            tokens.append(p["token"])
            logprobs.append(p["logprob"])
            tops.append({token: lp for _, token, lp in p["top"]})
    for t in result["tokens"]:
        tokens.append(t["token"])
        logprobs.append(t["logprob"])
        tops.append(dict(t["top"]))
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    block = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
    text = (request.query.prompt if request.echo else "") + result["text"]
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": text, "logprobs": block if request.logprobs else None,
                         "finish_reason": result["finish_reason"]}],
            "usage": _usage(result)}


async def _answer(request, *, parse: Callable, respond: Callable, batcher: _Batcher, limits: Limits):
    """Read, parse, queue and answer one request, within `limits.request_timeout_s` in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_timeout_s
    try:
        raw = await asyncio.wait_for(_read_body(request, limit=limits.max_body_bytes), limits.request_timeout_s)
    except TimeoutError:
        return _error(408, f"the request body did not arrive within {limits.request_timeout_s:g} s")
    if raw is None:
        return _error(413, f"request body exceeds {limits.max_body_bytes} bytes")
    try:
        parsed = parse(_parse_json(raw))
        result = await asyncio.wait_for(batcher.submit(parsed), max(0.0, deadline - loop.time()))
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    except TimeoutError:
        return _error(503, f"the model did not answer within the {limits.request_timeout_s:g} s deadline; "
                      "try again later")
    except Exception as exc:
        return _error(500, f"generation failed: {type(exc).__name__}: {exc}")
    return respond(result, parsed)


def create_app(*, adapter, model_name: str, limits: Limits | None = None):
    """The FastAPI app serving `adapter` (a GenerativeWhiteBox)."""
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    context = context_length(adapter)
    app = FastAPI(title="mmaudit reference model server", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = _Batcher(functools.partial(run_requests, adapter, context=context), limits)
    common = dict(batcher=batcher, limits=limits)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404/405 in the same error shape as everything else
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "owned_by": "mmaudit"}
        if context:
            card["max_model_len"] = context
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _answer(request, parse=functools.partial(parse_request, limits=limits, context=context),
                             respond=functools.partial(_completion, model_name=model_name), **common)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, parse=functools.partial(parse_completion, limits=limits, context=context),
                             respond=functools.partial(_text_completion, model_name=model_name), **common)

    return app


def load_generative(*, model_dir: str, device: str = "cpu", dtype: str | None = None):
    """A generative white-box adapter for a local folder; dual encoders and URLs are refused."""
    from audit.adapters import load_adapter
    from audit.adapters.base import GenerativeWhiteBox

    if str(model_dir).startswith(("http://", "https://")):
        raise InputError("serve needs a local model folder, not a URL", where=str(model_dir))
    adapter = load_adapter(model_dir, device=device, dtype=dtype)
    if not isinstance(adapter, GenerativeWhiteBox):
        raise InputError("only generative models can be served as chat completions "
                         f"({adapter.architecture} is a {adapter.capabilities.kind})", where=str(model_dir))
    return adapter


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(*, model_dir: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 16,
          request_timeout: float = 120.0, dtype: str | None = None) -> None:
    """Serve MODEL_DIR until SIGTERM or Ctrl-C. Arguments are checked before the model loads."""
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"must be an integer in 1-65535, got {port!r}", where="--port")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"must be >= 1, got {max_batch}", where="--max-batch")
    if not (isinstance(request_timeout, (int, float)) and 0 < request_timeout < float("inf")):
        raise InputError(f"must be a number of seconds > 0, got {request_timeout!r}", where="--request-timeout")
    if not _is_loopback(host):
        print(f"mmaudit: warning: binding {host}; the server has no authentication and anyone who can reach this "
              "address can use the model", file=sys.stderr)
    adapter = load_generative(model_dir=model_dir, device=device, dtype=dtype)
    limits = Limits(max_batch=max_batch, request_timeout_s=float(request_timeout))
    app = create_app(adapter=adapter, model_name=Path(model_dir).resolve().name, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=limits.shutdown_grace_s,
                limit_concurrency=limits.max_connections, timeout_keep_alive=5)
