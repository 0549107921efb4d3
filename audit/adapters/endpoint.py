"""Black-box adapter for OpenAI-compatible chat-completions endpoints (vLLM, `mmaudit serve`).

Closed choices are scored from the first generated position's `top_logprobs`: each
candidate's score is the log-probability of its first token (its first word, compared
case-insensitively without surrounding spaces). A candidate missing from the returned
top-k gets a floor one nat below the smallest listed log-probability (it is less likely
than anything listed; how much less the endpoint does not say). `retries` is the number of
attempts; timeouts, connection errors, 429 and 5xx are retried with exponential backoff;
other 4xx and malformed answers stop the run with a message naming the endpoint.
"""
from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from audit.adapters.base import Capabilities, ModelAdapter, Query
from audit.errors import InputError

__all__ = ["EndpointAdapter"]

FLOOR_GAP = 1.0
CHAT_PATH = "/v1/chat/completions"
RETRY_STATUS = frozenset({408, 429})  # besides 5xx: the server may answer later


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _base_url(url: str) -> str:
    # Accept the server root, its /v1 prefix or the full chat-completions URL.
    base = url.rstrip("/")
    for suffix in (CHAT_PATH, "/v1"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


class EndpointAdapter(ModelAdapter):
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, concurrency: int = 4, top_logprobs: int = 20) -> None:
        import httpx

        if retries < 1 or concurrency < 1:
            raise InputError("retries and concurrency must be >= 1", where=url)
        self.url = url.rstrip("/")
        self.base = _base_url(url)
        self.retries, self.concurrency, self.top_logprobs = retries, concurrency, top_logprobs
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model_name = model or self._discover_model()
        self.architecture = f"endpoint:{self.model_name}"
        self.device = "remote"
        self.capabilities = Capabilities(
            kind="generative", white_box=False, fusion="unknown", hooks=False, attention_patterns=False,
            gradients=False,
            notes=("black box: no hooks, attention or gradients", "choices scored from first-token top_logprobs"),
        )

    def close(self) -> None:
        self.client.close()

    def _attempt(self, method: str, where: str, payload: dict | None) -> tuple[object, str]:
        """(answer, "") on success, (None, why) when worth retrying; raises when it is not."""
        import httpx

        try:
            resp = self.client.request(method, where, json=payload)
        except httpx.TimeoutException:
            return None, "timed out"
        except httpx.TransportError as exc:
            return None, f"connection failed ({type(exc).__name__})"
        if resp.status_code >= 500 or resp.status_code in RETRY_STATUS:
            return None, f"HTTP {resp.status_code}"
        if resp.status_code >= 300:  # 3xx: redirects are not followed (they could leave the host)
            raise InputError(f"HTTP {resp.status_code}: {resp.text[:200]}", where=where)
        try:
            return resp.json(), ""
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            raise InputError("endpoint answered with something that is not JSON", where=where) from None

    def _request(self, method: str, path: str, payload: dict | None = None):
        where = f"{self.base}{path}"
        why = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
            data, why = self._attempt(method, where, payload)
            if not why:
                return data
        raise InputError(f"{why} after {self.retries} attempts", where=where)

    def _discover_model(self) -> str:
        data = self._request("GET", "/v1/models")
        try:
            return str(data["data"][0]["id"])
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

    def _first_position(self, data) -> dict[str, float]:
        """Log-probability of each token listed at the first generated position (stripped, lower-case)."""
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            listed = {first["token"].strip().lower(): float(first["logprob"])}
            for alt in first["top_logprobs"]:
                listed.setdefault(alt["token"].strip().lower(), float(alt["logprob"]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise InputError("answer has no usable logprobs.content[0].top_logprobs; "
                             "the server must support logprobs", where=f"{self.base}{CHAT_PATH}") from None
        return listed

    def _score_one(self, q: Query) -> np.ndarray:
        data = self._request("POST", CHAT_PATH, self._payload(q, max_tokens=1, top=self.top_logprobs))
        listed = self._first_position(data)
        floor = min(listed.values()) - FLOOR_GAP
        out = []
        for cand in q.candidates:
            words = cand.strip().lower().split()
            out.append(listed.get(words[0] if words else "", floor))
        return np.array(out, dtype=np.float64)

    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._score_one, queries))

    def _generate_one(self, q: Query, *, max_new_tokens: int) -> str:
        data = self._request("POST", CHAT_PATH, self._payload(q, max_tokens=max_new_tokens, top=0))
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError("answer has no choices[0].message.content", where=f"{self.base}{CHAT_PATH}") from None
        return "" if content is None else str(content)  # OpenAI sends null for an empty answer

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda q: self._generate_one(q, max_new_tokens=max_new_tokens), queries))
