"""`mmaudit serve`: an OpenAI-compatible chat-completions server for a local MODEL_DIR.

The same API shape as vLLM serves production models with, so the black-box adapter is
tested against it: `POST /v1/chat/completions` (images as `data:` URLs only, never fetched
from the network), `logprobs`/`top_logprobs`, `GET /v1/models`, `GET /health`. Decoding is
always greedy (`temperature` is accepted and ignored), streaming is not supported, and only
the last user message is read. Requests that arrive together are batched into one generate
call; results do not depend on the batch (left padding with position ids taken from the
attention mask, checked to 1e-4 by the tests). Malformed input gets a 4xx JSON error; the
server never crashes on it. Bound to 127.0.0.1 unless told otherwise.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` class on the
# handler, and fastapi is imported lazily (an optional extra), not at module level.
import asyncio
import base64
import binascii
import functools
import io
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from audit.adapters.base import Query
from audit.errors import InputError

__all__ = ["ChatRequest", "Limits", "create_app", "decode_image", "generate_steps", "load_generative",
           "parse_request", "serve"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    max_new_tokens: int = 64
    max_top_logprobs: int = 20
    max_batch: int = 16
    batch_window_s: float = 0.005


@dataclass(frozen=True)
class ChatRequest:
    query: Query
    max_tokens: int
    top_logprobs: int
    logprobs: bool


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


def _generation_options(body: dict, *, limits: Limits) -> tuple[int, int, bool]:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = min(16, limits.max_new_tokens)
    max_tokens = _bounded_int(max_tokens, name="max_tokens", low=1, high=limits.max_new_tokens)
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean")
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


def parse_request(body, *, limits: Limits) -> ChatRequest:
    """A validated request from an OpenAI chat-completions body; BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise BadRequest("'messages' has no user message")
    _check_unsupported(body)
    prompt, image = _content(user[-1].get("content"), limits=limits)
    max_tokens, top, logprobs = _generation_options(body, limits=limits)
    return ChatRequest(Query(prompt, image, ()), max_tokens, top, logprobs)


# ---------------------------------------------------------------------- generation
def generate_steps(adapter, queries: Sequence[Query], *, max_new_tokens: int, top_k: int) -> list[dict]:
    """The adapter's greedy generation, stop step included: an OpenAI server reports the
    end-of-sequence token with its log-probability (vLLM does), so a model whose likeliest
    first token is EOS still gives the black-box adapter first-position `top_logprobs`."""
    return adapter.generate_detailed(queries, max_new_tokens=max_new_tokens, top_k=top_k)


class _Batcher:
    """Collects requests arriving within a short window and generates each group in one call.

    `generate(queries, *, max_new_tokens, top_k)` runs in a worker thread, one call at a time
    (the adapter is not thread-safe). The loop outlives failing and cancelled requests.
    """

    def __init__(self, generate: Callable[..., list[dict]], limits: Limits) -> None:
        self.generate, self.limits = generate, limits
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
            items = await self._collect()
            groups: dict[tuple, list] = {}
            for it in items:  # processors need one image layout and one length per call
                r = it[0]
                groups.setdefault((r.query.image is not None, r.max_tokens, r.top_logprobs), []).append(it)
            for group in groups.values():
                await self._run(group)

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        await asyncio.sleep(self.limits.batch_window_s)
        while not self.queue.empty() and len(items) < self.limits.max_batch:
            items.append(self.queue.get_nowait())
        return [it for it in items if not it[1].done()]  # skip requests cancelled while waiting

    async def _run(self, group: list) -> None:
        first = group[0][0]
        try:
            results = await asyncio.to_thread(self.generate, [r.query for r, _ in group],
                                              max_new_tokens=first.max_tokens, top_k=first.top_logprobs)
            if len(results) != len(group):
                raise RuntimeError(f"generate returned {len(results)} results for {len(group)} queries")
        except Exception as exc:
            if len(group) > 1:  # retry alone, so one bad request does not fail its neighbours
                for item in group:
                    await self._run([item])
                return
            _settle(group[0][1], exc=exc)
            return
        for (_, fut), result in zip(group, results):
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


def _completion(result: dict, request: ChatRequest, *, model_name: str) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [{**entry(t["token"], t["logprob"]), "top_logprobs": [entry(s, lp) for s, lp in t["top"]]}
               for t in result["tokens"]]
    used = {"prompt_tokens": result.get("prompt_tokens", 0), "completion_tokens": len(result["tokens"])}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": {"content": content} if request.logprobs else None,
                     "finish_reason": result["finish_reason"]}],
        "usage": {**used, "total_tokens": used["prompt_tokens"] + used["completion_tokens"]},
    }


def create_app(*, adapter, model_name: str, limits: Limits | None = None):
    """The FastAPI app serving `adapter` (a GenerativeWhiteBox)."""
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    app = FastAPI(title="mmaudit reference model server", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = _Batcher(functools.partial(generate_steps, adapter), limits)

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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mmaudit"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await _read_body(request, limit=limits.max_body_bytes)
        if raw is None:
            return _error(413, f"request body exceeds {limits.max_body_bytes} bytes")
        try:
            parsed = parse_request(_parse_json(raw), limits=limits)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        try:
            result = await batcher.submit(parsed)
        except Exception as exc:
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}")
        return _completion(result, parsed, model_name=model_name)

    return app


def load_generative(*, model_dir: str, device: str = "cpu"):
    """A generative white-box adapter for a local folder; dual encoders and URLs are refused."""
    from audit.adapters import load_adapter
    from audit.adapters.base import GenerativeWhiteBox

    if str(model_dir).startswith(("http://", "https://")):
        raise InputError("serve needs a local model folder, not a URL", where=str(model_dir))
    adapter = load_adapter(model_dir, device=device)
    if not isinstance(adapter, GenerativeWhiteBox):
        raise InputError("only generative models can be served as chat completions "
                         f"({adapter.architecture} is a {adapter.capabilities.kind})", where=str(model_dir))
    return adapter


def serve(*, model_dir: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 16) -> None:
    import uvicorn

    if max_batch < 1:
        raise InputError(f"must be >= 1, got {max_batch}", where="--max-batch")
    adapter = load_generative(model_dir=model_dir, device=device)
    app = create_app(adapter=adapter, model_name=Path(model_dir).resolve().name, limits=Limits(max_batch=max_batch))
    uvicorn.run(app, host=host, port=port, log_level="info")
