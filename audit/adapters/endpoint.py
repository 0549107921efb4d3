"""Black-box adapter for OpenAI-compatible chat endpoints (vLLM, `mmaudit serve`).

Scoring (`scoring="auto"` probes the server once, at construction):

- exact: the summed log-probability of each candidate's tokens, read from vLLM's
  `prompt_logprobs` extension of /v1/chat/completions. Per query, one request renders the
  context (the user's turn, `add_generation_prompt: true`) and one per candidate sends it as
  an open final assistant message (`continue_final_message: true,
  add_generation_prompt: false`); a candidate's score sums the prompt log-probabilities
  after the longest token prefix that every candidate shares with the context (normally
  the whole context: then it is exactly the lm-eval continuation log-probability).
  Not /v1/completions + `echo`: vLLM's /v1/completions takes text or token ids only (no
  images), and a black-box client cannot apply the model's chat template itself. Chat
  `echo` returns the echoed text only, never its log-probabilities.
- first_token (the fallback, and `capabilities.notes` says so): the log-probability of each
  candidate's first word at the first generated position (`top_logprobs`). Approximate:
  candidates that share a first word tie, and a candidate missing from the top-k gets a
  floor one nat below the smallest listed value.

Every log-probability must be a finite number: NaN, infinities or a missing value stop the
run (fail closed) instead of being audited as a tie.

Transport: each attempt has a total deadline (`timeout`: connect, send, headers and body
together; a server that drips a byte a second is cut off), answers are read incrementally
and refused past `max_response_bytes`, raw or decompressed (gzip/deflate are decoded here,
bounded; other encodings are refused). `retries` is the number of attempts; timeouts,
connection errors, 408, 429 and 5xx are retried with exponential backoff; 401/403 stop with
one line naming the API-key variable; other 3xx/4xx and malformed answers stop the run.

The API key is sent as `Authorization: Bearer` and never logged, repr'd, pickled or put in
a message (text echoed by the server is redacted too).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from audit.adapters.base import Capabilities, ModelAdapter, Query
from audit.errors import InputError

__all__ = ["EndpointAdapter", "APPROXIMATE_NOTE", "EXACT_NOTE", "image_data_url"]

FLOOR_GAP = 1.0
CHAT_PATH = "/v1/chat/completions"
RETRY_STATUS = frozenset({408, 429})  # besides 5xx: the server may answer later
NOT_OFFERED = frozenset({400, 404, 405, 422})  # how servers refuse a parameter or route they lack
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
ERROR_BODY_BYTES = 64 * 1024
SCORING = ("auto", "exact", "first_token")
BLACK_BOX_NOTE = "black box: no hooks, attention or gradients"
EXACT_NOTE = ("choices scored exactly: summed prompt log-probabilities of each candidate "
              "(vLLM prompt_logprobs with continue_final_message)")
APPROXIMATE_NOTE = ("approximate scores: the endpoint offers no prompt log-probabilities, so each choice is "
                    "scored by the log-probability of its first word at the first generated position; candidates "
                    "sharing a first word tie and candidates outside the top_logprobs get a floor value")
# A text-only request every chat model can render; used once to see whether exact scoring is offered.
PROBE = Query("Answer yes or no: is this a test?", None, ("yes",))


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _root_cause(exc: BaseException) -> str:
    """The innermost OS error's text ("[Errno 111] ... refused", "Name or service not known")."""
    seen, found = set(), str(exc)
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.strerror:
            found = exc.strerror
        exc = exc.__cause__ or exc.__context__
    return found


def _shown(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)  # never echo credentials written into a URL


def _base_url(url: str) -> str:
    """Scheme, host, port and path prefix of the server; root, /v1 or the chat URL accepted."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InputError(f"not a valid URL ({_one_line(exc)})", where=_shown(str(url))) from None
    if parsed.scheme not in ("http", "https") or not parsed.host or "%" in parsed.host:
        raise InputError("the endpoint must be an http:// or https:// URL with a host", where=_shown(url))
    if parsed.userinfo:
        raise InputError("credentials in the URL are refused; name an API-key variable instead", where=_shown(url))
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise InputError(f"port {parsed.port} is outside 1-65535", where=url)
    if parsed.query or parsed.fragment:
        raise InputError("the endpoint URL must not have a query or fragment", where=url)
    base = str(parsed.copy_with(path=parsed.path.rstrip("/") or "/")).rstrip("/")
    for suffix in (CHAT_PATH, "/v1"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _header_pairs(headers) -> dict[str, str]:
    if isinstance(headers, str):
        headers = [headers]
    pairs = headers.items() if isinstance(headers, Mapping) else [_split_header(h) for h in headers]
    out = {}
    for name, value in pairs:
        name, value = str(name).strip(), str(value).strip()
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or any(c in value for c in "\r\n\0"):
            raise InputError(f"header {name[:40]!r} is not a valid HTTP header", where="--header")
        out[name] = value
    return out


def _split_header(text: str) -> tuple[str, str]:
    name, sep, value = str(text).partition(":")
    if not sep:
        raise InputError("a header must be written 'Name: value'", where="--header")
    return name, value


class _Secret:
    """A credential: kept to be sent, never shown or pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a credential cannot be pickled")


class _HTTPStatus(InputError):
    """A 3xx/4xx answer (not retried); `status` lets the capability probe tell 'not offered'."""

    def __init__(self, message: str, *, status: int, where: str) -> None:
        super().__init__(message, where=where)
        self.status = status


class _NotOffered(Exception):
    pass


class _Body:
    """A response body read incrementally: gzip/deflate decoded here with a hard output cap."""

    def __init__(self, encoding: str, *, limit: int, where: str) -> None:
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self.z = None
        elif enc in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self.z = zlib.decompressobj()
        else:
            raise InputError(f"the answer uses Content-Encoding {enc[:40]!r}, which is not supported", where=where)
        self.limit, self.where = limit, where
        self.parts: list[bytes] = []
        self.raw = self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.raw += len(chunk)
        if self.raw > self.limit:
            self._refuse()
        if self.z is None:
            return self._add(chunk)
        try:
            while chunk:  # max_length bounds each step's output: a bomb never expands in memory
                self._add(self.z.decompress(chunk, self.limit - self.size + 1))
                chunk = self.z.unconsumed_tail
        except zlib.error:
            raise InputError("the answer's compressed body is corrupt", where=self.where) from None

    def finish(self) -> bytes:
        if self.z is not None:
            try:
                self._add(self.z.flush())  # at most one match's worth is left once all input was consumed
            except zlib.error:
                raise InputError("the answer's compressed body is corrupt", where=self.where) from None
        return b"".join(self.parts)

    def _add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            self._refuse()
        self.parts.append(piece)

    def _refuse(self):
        raise InputError(f"the answer exceeds {self.limit} bytes (after decompression); refused", where=self.where)


def _finite(value, *, where: str, query: Query) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x):
        raise InputError(f"non-finite or missing log-probability ({_one_line(repr(value), 40)}) for the query "
                         f"{query.prompt[:60]!r}; refusing to score it", where=where)
    return x


def _prompt_entries(data, *, where: str, query: Query) -> list[tuple[int, float]]:
    """(token id, log-probability) of every prompt token after the first, from vLLM's
    `prompt_logprobs` (top level for chat, in choices[0] for completions). vLLM lists the
    prompt token itself first in each position's dict."""
    entries = data.get("prompt_logprobs") if isinstance(data, dict) else None
    if entries is None and isinstance(data, dict):
        with_choices = data.get("choices")
        if isinstance(with_choices, list) and with_choices and isinstance(with_choices[0], dict):
            entries = with_choices[0].get("prompt_logprobs")
    if entries is None:
        raise _NotOffered
    if not isinstance(entries, list) or len(entries) < 2:
        raise InputError("prompt_logprobs is not a list of positions", where=where)
    out = []
    for entry in entries[1:]:
        if not isinstance(entry, dict) or not entry:
            raise InputError("prompt_logprobs has an empty position", where=where)
        key, value = next(iter(entry.items()))
        logprob = value.get("logprob") if isinstance(value, dict) else value
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InputError(f"prompt_logprobs key {_one_line(key, 40)!r} is not a token id", where=where) from None
        out.append((token, _finite(logprob, where=where, query=query)))
    return out


async def _all(coros) -> list:
    """Results in order; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class EndpointAdapter(ModelAdapter):
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = 60.0, retries: int = 3, concurrency: int = 4,
                 headers: Mapping[str, str] | Sequence[str] = (), top_logprobs: int = 20, scoring: str = "auto",
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.base = _base_url(url)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise InputError(f"retries must be an integer >= 1, got {retries!r}", where=self.base)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InputError(f"concurrency must be an integer >= 1, got {concurrency!r}", where=self.base)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise InputError(f"timeout must be a number of seconds > 0, got {timeout!r}", where=self.base)
        if scoring not in SCORING:
            raise InputError(f"scoring must be one of {', '.join(SCORING)}, got {scoring!r}", where=self.base)
        if not 1 <= top_logprobs <= 20 or max_response_bytes < 1024:
            raise InputError("top_logprobs must be in 1-20 and max_response_bytes >= 1024", where=self.base)
        self.retries, self.concurrency, self.timeout = retries, concurrency, float(timeout)
        self.top_logprobs, self.max_response_bytes = top_logprobs, max_response_bytes
        self.api_key_env = api_key_env
        extra = _header_pairs(headers)
        if api_key and any(k.lower() == "authorization" for k in extra):
            raise InputError("give the API key or an Authorization header, not both", where="--header")
        self._key = _Secret(api_key) if api_key else None
        self._extra = {k: _Secret(v) for k, v in extra.items()}
        self.device = "remote"
        self.model_name = model or self._discover_model()
        self.architecture = f"endpoint:{self.model_name}"
        self.scoring = "first_token" if scoring == "first_token" else self._probe_scoring(required=scoring == "exact")
        self.capabilities = Capabilities(
            kind="generative", white_box=False, fusion="unknown", hooks=False, attention_patterns=False,
            gradients=False, notes=(BLACK_BOX_NOTE, EXACT_NOTE if self.scoring == "exact" else APPROXIMATE_NOTE))

    def __getstate__(self):
        raise TypeError("an EndpointAdapter holds a credential and cannot be pickled; open one per process")

    def describe(self) -> dict:
        return {**super().describe(), "scoring": self.scoring}

    # ------------------------------------------------------------------ transport
    def _headers(self) -> dict[str, str]:
        out = {k: v.reveal() for k, v in self._extra.items()}
        out["Accept-Encoding"] = "gzip, deflate"  # only what _Body decodes
        if self._key is not None:
            out["Authorization"] = f"Bearer {self._key.reveal()}"
        return out

    def _redact(self, text: str) -> str:
        for secret in (self._key, *self._extra.values()):
            if secret is not None and len(secret.reveal()) >= 4:
                text = text.replace(secret.reveal(), "***")
        return text

    def _run(self, work):
        """Run `work(client, slots)` (a coroutine function) to completion from synchronous code."""
        async def main():
            import httpx

            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            async with httpx.AsyncClient(timeout=self.timeout, limits=limits, follow_redirects=False) as client:
                return await work(client, asyncio.Semaphore(self.concurrency))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        with ThreadPoolExecutor(1) as pool:  # called inside an event loop (a notebook): a thread of its own
            return pool.submit(asyncio.run, main()).result()

    def _auth_message(self, status: int) -> str:
        var = self.api_key_env
        if self._key is None:
            how = (f"set {var}" if var else "put the key in an environment variable and name it with --api-key-env "
                   "(default OPENAI_API_KEY)")
            return f"HTTP {status}: the endpoint wants an API key and none was sent; {how}"
        source = f"${var}" if var else "the api_key argument"
        return f"HTTP {status}: the endpoint refused the API key from {source}"

    async def _attempt(self, client, method: str, url: str, payload: dict | None):
        """(answer, "") on success, (None, why) when worth retrying; raises when it is not."""
        import httpx

        try:
            async with client.stream(method, url, json=payload, headers=self._headers()) as resp:
                status = resp.status_code
                if status in (401, 403):
                    raise InputError(self._auth_message(status), where=url)
                if status >= 500 or status in RETRY_STATUS:
                    return None, f"HTTP {status}"
                limit = self.max_response_bytes if status < 300 else ERROR_BODY_BYTES
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit and status < 300:
                    raise InputError(f"the answer declares {declared} bytes, over the {limit}-byte limit", where=url)
                body = _Body(resp.headers.get("content-encoding", ""), limit=limit, where=url)
                try:
                    async for chunk in resp.aiter_raw():
                        body.feed(chunk)
                    raw = body.finish()
                except InputError:
                    if status < 300:
                        raise
                    raw = b"".join(body.parts)  # an oversized error page: its head is enough
        except httpx.TimeoutException:
            return None, "timed out"
        except httpx.TransportError as exc:
            return None, f"connection failed: {_one_line(self._redact(_root_cause(exc)))}"
        if status >= 300:  # 3xx: redirects are not followed (they could leave the host)
            raise _HTTPStatus(f"HTTP {status}: {self._error_text(raw)}", status=status, where=url)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, bytes that are not UTF-8, absurd nesting
            raise InputError("endpoint answered with something that is not JSON", where=url) from None
        if not isinstance(data, dict):
            raise InputError("endpoint answered with JSON that is not an object", where=url)
        return data, ""

    def _error_text(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        try:
            err = json.loads(text).get("error")
            text = err.get("message", text) if isinstance(err, dict) else (err or text)
        except (ValueError, AttributeError, RecursionError):
            pass
        return _one_line(self._redact(str(text)))

    async def _request(self, client, method: str, path: str, payload: dict | None = None) -> dict:
        url = f"{self.base}{path}"
        why = ""
        for attempt in range(self.retries):
            if attempt:
                await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
            try:
                async with asyncio.timeout(self.timeout):  # the whole attempt, not each read
                    data, why = await self._attempt(client, method, url, payload)
            except TimeoutError:
                data, why = None, f"no complete answer within the {self.timeout:g} s deadline"
            if not why:
                return data
        raise InputError(f"{why} after {self.retries} attempt{'s' if self.retries > 1 else ''}", where=url)

    # ------------------------------------------------------------------ set-up
    def _discover_model(self) -> str:
        data = self._run(lambda client, _: self._request(client, "GET", "/v1/models"))
        listed = data.get("data")
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise InputError("GET /v1/models answered without a list of model ids", where=self.base)
        ids = [m["id"] for m in listed]
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise InputError("GET /v1/models lists no model; name the served model with --endpoint-model",
                             where=self.base)
        shown = ", ".join(_one_line(i, 80) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        raise InputError(f"the endpoint serves {len(ids)} models ({shown}); choose one with --endpoint-model",
                         where=self.base)

    def _probe_scoring(self, *, required: bool) -> str:
        """'exact' when the server answers a prompt-log-probability request, else 'first_token'."""
        async def probe(client, slots):
            try:
                await self._exact_scores(client, slots, PROBE)
                return "exact"
            except _NotOffered:
                pass
            except _HTTPStatus as exc:
                if exc.status not in NOT_OFFERED:
                    raise
            if required:
                raise InputError("the endpoint offers no prompt log-probabilities (vLLM's prompt_logprobs with "
                                 "continue_final_message), so exact scoring is impossible", where=self.base)
            # A refusal could also mean a wrong model name: a plain request must work.
            await self._request(client, "POST", CHAT_PATH, self._payload(PROBE, max_tokens=1))
            return "first_token"

        return self._run(probe)

    # ------------------------------------------------------------------ requests
    def _payload(self, q: Query, *, max_tokens: int, top: int = 0, image_url: str | None = None) -> dict:
        if q.image is not None and image_url is None:
            image_url = image_data_url(q.image)
        content = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
        content.append({"type": "text", "text": q.prompt})
        messages = [{"role": "user", "content": content}]
        body = {"model": self.model_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if top:
            body.update(logprobs=True, top_logprobs=top)
        return body

    async def _prompt_tokens(self, client, q: Query, candidate: str | None, image_url: str | None):
        body = self._payload(q, max_tokens=1, image_url=image_url)
        if candidate is not None:
            body["messages"].append({"role": "assistant", "content": candidate})
        body.update(prompt_logprobs=0, add_generation_prompt=candidate is None,
                    continue_final_message=candidate is not None)
        data = await self._request(client, "POST", CHAT_PATH, body)
        return _prompt_entries(data, where=f"{self.base}{CHAT_PATH}", query=q)

    async def _exact_scores(self, client, slots, q: Query) -> np.ndarray:
        async with slots:  # one query's requests in turn; `concurrency` queries at once
            image_url = image_data_url(q.image) if q.image is not None else None
            context = await self._prompt_tokens(client, q, None, image_url)
            rows = [await self._prompt_tokens(client, q, c, image_url) for c in q.candidates]
        ctx_ids = [t for t, _ in context]
        start = min([len(ctx_ids), *(_common_prefix(ctx_ids, [t for t, _ in r]) for r in rows)])
        out = []
        for cand, row in zip(q.candidates, rows):
            if len(row) <= start:
                raise InputError(f"candidate {cand[:40]!r} adds no tokens to the prompt", where=self.base)
            out.append(sum(lp for _, lp in row[start:]))
        return np.array(out, dtype=np.float64)

    def _first_position(self, data, q: Query) -> dict[str, float]:
        """Log-probability of each token listed at the first generated position (stripped, lower-case)."""
        where = f"{self.base}{CHAT_PATH}"
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            pairs = [(first["token"], first.get("logprob")), *((a["token"], a.get("logprob"))
                                                              for a in first["top_logprobs"])]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise InputError("answer has no usable logprobs.content[0].top_logprobs; "
                             "the server must support logprobs", where=where) from None
        listed: dict[str, float] = {}
        for token, logprob in pairs:
            listed.setdefault(str(token).strip().lower(), _finite(logprob, where=where, query=q))
        return listed

    async def _first_token_scores(self, client, slots, q: Query) -> np.ndarray:
        async with slots:
            data = await self._request(client, "POST", CHAT_PATH,
                                       self._payload(q, max_tokens=1, top=self.top_logprobs))
        listed = self._first_position(data, q)
        floor = min(listed.values()) - FLOOR_GAP
        out = []
        for cand in q.candidates:
            words = cand.strip().lower().split()
            out.append(listed.get(words[0] if words else "", floor))
        return np.array(out, dtype=np.float64)

    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        one = self._exact_scores if self.scoring == "exact" else self._first_token_scores

        async def work(client, slots):
            return await _all(one(client, slots, q) for q in queries)

        return self._run(work) if queries else []

    async def _generate_one(self, client, slots, q: Query, max_new_tokens: int) -> str:
        async with slots:
            data = await self._request(client, "POST", CHAT_PATH, self._payload(q, max_tokens=max_new_tokens))
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError("answer has no choices[0].message.content", where=f"{self.base}{CHAT_PATH}") from None
        return "" if content is None else str(content)  # OpenAI sends null for an empty answer

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        async def work(client, slots):
            return await _all(self._generate_one(client, slots, q, max_new_tokens) for q in queries)

        return self._run(work) if queries else []
