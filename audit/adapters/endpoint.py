"""Black-box adapter for OpenAI-compatible chat-completions endpoints (vLLM, `mmaudit serve`).

Closed choices are scored from the first generated position's `top_logprobs`: each
candidate's score is the log-probability of its first token. A candidate missing from the
returned top-k gets a floor one nat below the smallest listed log-probability (it is less
likely than anything listed; how much less the endpoint does not say). Retries with
exponential backoff on timeouts, connection errors and 5xx; 4xx and malformed answers
stop the run with a message naming the endpoint.
"""
from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from audit.adapters.base import Capabilities, ModelAdapter, Query
from audit.errors import InputError

__all__ = ["EndpointAdapter"]

FLOOR_GAP = 1.0


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class EndpointAdapter(ModelAdapter):
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, concurrency: int = 4, top_logprobs: int = 20) -> None:
        import httpx

        self.url = url.rstrip("/")
        base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.base = base
        self.retries, self.concurrency, self.top_logprobs = retries, concurrency, top_logprobs
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model_name = model or self._discover_model()
        self.architecture = f"endpoint:{self.model_name}"
        self.device = "remote"
        self.capabilities = Capabilities(
            kind="generative", white_box=False, fusion="unknown", hooks=False, attention_patterns=False,
            gradients=False, generate=True, logprobs=True,
            notes=("black box: no hooks, attention or gradients", "choices scored from first-token top_logprobs"),
        )

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        import httpx

        where = f"{self.base}{path}"
        last = None
        for attempt in range(self.retries):
            try:
                resp = self.client.request(method, where, json=payload)
            except httpx.TimeoutException:
                last = "timed out"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__})"
            else:
                if resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}"
                elif resp.status_code >= 400:
                    raise InputError(f"HTTP {resp.status_code}: {resp.text[:200]}", where=where)
                else:
                    try:
                        return resp.json()
                    except json.JSONDecodeError:
                        raise InputError("endpoint answered with something that is not JSON", where=where) from None
            time.sleep(min(0.25 * 2 ** attempt, 4.0))
        raise InputError(f"{last} after {self.retries} attempts", where=where)

    def _discover_model(self) -> str:
        data = self._request("GET", "/v1/models")
        try:
            return data["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise InputError("GET /v1/models answered without a model id", where=self.base) from None

    def _payload(self, q: Query, *, max_tokens: int, top: int) -> dict:
        content = ([{"type": "image_url", "image_url": {"url": image_data_url(q.image)}}] if q.image is not None else [])
        content.append({"type": "text", "text": q.prompt})
        body = {"model": self.model_name, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0}
        if top:
            body.update(logprobs=True, top_logprobs=top)
        return body

    def _score_one(self, q: Query) -> np.ndarray:
        data = self._request("POST", "/v1/chat/completions", self._payload(q, max_tokens=1, top=self.top_logprobs))
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            listed = {first["token"].strip().lower(): float(first["logprob"])}
            for alt in first["top_logprobs"]:
                listed.setdefault(alt["token"].strip().lower(), float(alt["logprob"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise InputError("answer has no usable logprobs.content[0].top_logprobs; "
                             "the server must support logprobs", where=f"{self.base}/v1/chat/completions") from None
        floor = min(listed.values()) - FLOOR_GAP
        out = []
        for cand in q.candidates:
            words = cand.strip().lower().split()
            out.append(listed.get(words[0] if words else "", floor))
        return np.array(out, dtype=np.float64)

    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._score_one, queries))

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        def one(q: Query) -> str:
            data = self._request("POST", "/v1/chat/completions", self._payload(q, max_tokens=max_new_tokens, top=0))
            try:
                return str(data["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError):
                raise InputError("answer has no choices[0].message.content", where=self.base) from None

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, queries))
