"""Generate mode: score closed choices from what the model writes, as published benchmarks do.

`GenerateModeAdapter(inner, max_new_tokens=...)` wraps any generative adapter (white box or
endpoint). Its `score` generates an answer per query (greedy) and reads the choice with
`audit.answers.extract_choice` (POPE's yes/no rule, VLMEvalKit's option and text rules).
Each query's score vector is an indicator, not a log-probability: 0 for the parsed choice
and `OTHER_SCORE` for the rest, all 0 when nothing parses (a tie: every argmax-style
reader then takes the first candidate, so unparsed answers must be reported). The counts
are kept on the adapter: `answers_read` and `parse_failures`.

Only outputs are exposed: no hooks, gradients or attention, whatever the inner adapter is.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from audit.adapters.base import Capabilities, ModelAdapter, Query
from audit.answers import extract_choice
from audit.errors import InputError

__all__ = ["GenerateModeAdapter", "OTHER_SCORE", "GENERATE_NOTE"]

OTHER_SCORE = -1e4  # softmax weight exp(-1e4) == 0: the parsed choice takes all the mass
GENERATE_NOTE = ("generate mode: choices are read from greedy generated text (POPE's yes/no rule, VLMEvalKit's "
                 "option-letter and choice-text rules); scores are indicators (0 for the parsed choice, -1e4 for "
                 "the others, all 0 when the answer does not parse), not log-probabilities")


class GenerateModeAdapter(ModelAdapter):
    def __init__(self, inner: ModelAdapter, *, max_new_tokens: int = 32) -> None:
        if inner.capabilities.kind != "generative":
            raise InputError(f"generate mode needs a generative model; {inner.architecture} is a "
                             f"{inner.capabilities.kind}", where="--score-mode")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}", where="--score-mode")
        self.inner = inner
        self.max_new_tokens = max_new_tokens
        self.architecture = inner.architecture
        self.device = inner.device
        self.capabilities = Capabilities(kind="generative", white_box=False, fusion=inner.capabilities.fusion,
                                         logprobs=False, notes=(GENERATE_NOTE,))
        self.last_answers: list[str] = []  # the texts behind the latest score() (--log-samples reads them)
        self.answers_read = 0
        self.parse_failures = 0
        self._lock = threading.Lock()  # counters stay right if threads share the adapter

    def describe(self) -> dict:
        return {**self.inner.describe(), "white_box": False, "score_mode": "generate",
                "max_new_tokens": self.max_new_tokens}

    def close(self) -> None:
        self.inner.close()

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        return self.inner.generate(queries, max_new_tokens=max_new_tokens)

    def _answers(self, queries: Sequence[Query], batch_size: int) -> list[str]:
        out: list[str | None] = [None] * len(queries)
        # White-box generation cannot batch image and text-only queries together.
        for has_image in (True, False):
            idx = [i for i, q in enumerate(queries) if (q.image is not None) == has_image]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                texts = self.inner.generate([queries[i] for i in chunk], max_new_tokens=self.max_new_tokens)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out  # type: ignore[return-value]

    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        answers = self._answers(queries, max(1, batch_size))
        scores, failures = [], 0
        for q, answer in zip(queries, answers):
            s = np.zeros(len(q.candidates), dtype=np.float64)
            choice = extract_choice(answer, q.candidates, prompt=q.prompt) if q.candidates else None
            if choice is None:
                failures += 1
            else:
                s[:] = OTHER_SCORE
                s[choice] = 0.0
            scores.append(s)
        with self._lock:
            self.answers_read += len(queries)
            self.parse_failures += failures
            self.last_answers = list(answers)
        return scores
