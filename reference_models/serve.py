"""`mmaudit serve`: an OpenAI-compatible chat-completions server for a local MODEL_DIR.

The same API shape as vLLM serves production models with, so the black-box adapter is
tested against it: `POST /v1/chat/completions` (images as `data:` URLs only, never fetched
from the network), `logprobs`/`top_logprobs`, `GET /v1/models`, `GET /health`. Requests
that arrive together are batched into one generate call. Malformed input gets a 4xx JSON
error; the server never crashes on it. Bound to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from audit.adapters.base import Query
from audit.errors import InputError

__all__ = ["create_app", "serve", "Limits"]


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    max_new_tokens: int = 64
    max_top_logprobs: int = 20
    max_batch: int = 16
    batch_window_s: float = 0.005


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(url: str, limits: Limits) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise BadRequest("image_url must be a data:image/...;base64 URL (remote URLs are not fetched)")
    try:
        header, payload = url.split(",", 1)
        if not header.endswith(";base64"):
            raise ValueError
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest("image_url is not valid base64 data") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > limits.max_image_pixels:
            raise BadRequest(f"image of {img.width}x{img.height} exceeds {limits.max_image_pixels} pixels", 413)
        if img.format not in ("PNG", "JPEG", "WEBP"):
            raise BadRequest(f"image format {img.format} is not PNG, JPEG or WebP")
        return img.convert("RGB")
    except BadRequest:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data
        raise BadRequest(f"image could not be decoded ({type(exc).__name__})") from None


def parse_request(body: dict, limits: Limits) -> tuple[Query, int, int]:
    """(query, max_new_tokens, top_logprobs) from an OpenAI chat-completions body."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise BadRequest("'messages' has no user message")
    content = user[-1].get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(decode_image(part["image_url"].get("url"), limits))
            else:
                raise BadRequest(f"unsupported content part {kind!r}")
    else:
        raise BadRequest("message 'content' must be a string or a list of parts")
    if len(images) > 1:
        raise BadRequest("at most one image per request is supported")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_new_tokens:
        raise BadRequest(f"'max_tokens' must be an integer in [1, {limits.max_new_tokens}]")
    top = body.get("top_logprobs", 0) if body.get("logprobs") else 0
    if not isinstance(top, int) or not 0 <= top <= limits.max_top_logprobs:
        raise BadRequest(f"'top_logprobs' must be an integer in [0, {limits.max_top_logprobs}]")
    temperature = body.get("temperature", 0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest("'temperature' must be a number >= 0")
    return Query(" ".join(texts).strip(), images[0] if images else None, ()), max_tokens, top


class _Batcher:
    """Collects concurrent requests for a short window and generates them in one call."""

    def __init__(self, adapter, limits: Limits) -> None:
        self.adapter, self.limits = adapter, limits
        self.queue: asyncio.Queue | None = None

    async def submit(self, query: Query, max_tokens: int, top: int) -> dict:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((query, max_tokens, top, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(self.limits.batch_window_s)
            while not self.queue.empty() and len(items) < self.limits.max_batch:
                items.append(self.queue.get_nowait())
            # One generate call per (has image, max_tokens, top) group: processors need it.
            groups: dict[tuple, list] = {}
            for it in items:
                groups.setdefault((it[0].image is not None, it[1], it[2]), []).append(it)
            for (_, max_tokens, top), group in groups.items():
                try:
                    results = await asyncio.to_thread(self.adapter.generate_detailed, [g[0] for g in group],
                                                      max_new_tokens=max_tokens, top_k=top)
                    for g, r in zip(group, results):
                        g[3].set_result(r)
                except Exception as exc:  # surfaced as a 500 JSON error for each request
                    for g in group:
                        if not g[3].done():
                            g[3].set_exception(exc)


def create_app(adapter, *, model_name: str, limits: Limits = Limits()):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="mmaudit reference model server")
    batcher = _Batcher(adapter, limits)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error"
                                                                   if status < 500 else "server_error", "code": status}})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mmaudit"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return error(413, f"request body exceeds {limits.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return error(413, f"request body exceeds {limits.max_body_bytes} bytes")
        try:
            import json

            body = json.loads(raw)
            query, max_tokens, top = parse_request(body, limits)
        except BadRequest as exc:
            return error(exc.status, str(exc))
        except ValueError:
            return error(400, "request body is not valid JSON")
        try:
            result = await batcher.submit(query, max_tokens, top)
        except Exception as exc:
            return error(500, f"generation failed: {type(exc).__name__}: {exc}")
        content = [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode()),
                    "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t["top"]]}
                   for t in result["tokens"]]
        finish = "length" if len(result["tokens"]) >= max_tokens else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": {"content": content} if top or body.get("logprobs") else None,
                         "finish_reason": finish}],
            "usage": {"completion_tokens": len(result["tokens"])},
        }

    return app


def load_generative(model_dir: str, device: str = "cpu"):
    from audit.adapters import load_adapter

    adapter = load_adapter(model_dir, device=device)
    if adapter.capabilities.kind != "generative":
        raise InputError("only generative models can be served as chat completions "
                         f"({adapter.architecture} is a {adapter.capabilities.kind})", where=model_dir)
    return adapter


def serve(*, model_dir: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 16) -> None:
    import uvicorn

    adapter = load_generative(model_dir, device)
    app = create_app(adapter, model_name=Path(model_dir).resolve().name, limits=Limits(max_batch=max_batch))
    uvicorn.run(app, host=host, port=port, log_level="info")
