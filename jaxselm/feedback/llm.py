"""LLM judge over an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs).

Each question is one ``POST {base_url}/chat/completions`` with
``{"model", "messages", "temperature", "max_tokens"}``; the verdict is read from
``choices[0].message.content``. Two modes (:class:`~jaxselm.feedback.config.LLMJudgeConfig`):

* ``pairwise`` -- "which of A and B is better?". LLM judges prefer one position (often the
  first), so every comparison is asked in **both orders** and the verdicts averaged:
  P(a beats b) = ([a shown first and A chosen] + [b shown first and B chosen]) / 2. A judge that
  always answers "A" thus yields 0.5, a tie, instead of a spurious preference. ``score`` ranks
  the responses sharing a prompt by their mean win probability against each other (round robin;
  identical responses tie without a request); a response alone with its prompt cannot be scored.
* ``scoring`` -- "rate this from min_score to max_score"; the score is parsed from the reply.

Failure handling, so a flaky server costs items, not runs:

* timeouts, connection errors, HTTP 5xx, 408 and 429 are retried up to ``max_retries`` times with
  exponential back-off (429 is a 4xx, but it means "slow down", the one 4xx worth retrying); a
  ``Retry-After`` header (seconds or an HTTP date, sent with 429 / 503 by rate-limited APIs)
  lengthens the wait to what the server asked, up to ``retry_after_max_s``;
* other 4xx are not retried: 401/403/404 mean every request will fail the same way (bad key,
  wrong URL or model), so they raise a one-line JudgeError at once; the rest (e.g. 400 for one
  over-long prompt) mark that item NaN;
* a reply whose verdict cannot be parsed is counted (``unparseable``) and its item is NaN; the
  caller drops NaN items (:func:`jaxselm.feedback.pairs.build_pairs` does).

Requests run on a thread pool of ``concurrency`` workers (HTTP waits release the GIL). The API key
is read from the environment variable named by ``api_key_env`` when a batch starts and only ever
placed in the ``Authorization: Bearer`` header: it is not stored on the judge, not in its repr,
and never logged (log lines name the URL, status and attempt only). Counters (requests, retries,
timeouts, HTTP and connection errors, latency) are in ``stats()``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxselm.errors import JudgeError
from jaxselm.feedback.base import Judge, Response
from jaxselm.feedback.config import LLMJudgeConfig

log = logging.getLogger(__name__)

def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable (then only the back-off applies)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


_FAILED = object()  # a request that failed for good (after retries, or a non-retryable 4xx)
_FATAL_STATUS = (401, 403, 404)
_RETRY_4XX = (408, 429)

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_pairwise(text: str) -> str | None:
    """'A' or 'B' from a pairwise verdict, or None when it is absent or ambiguous.

    Accepted: a bare letter (any case, punctuation and markdown around it), ``[[A]]`` (MT-bench
    style), or a sentence naming exactly one of the standalone capitals A / B ("Response B").
    """
    bracket = set(re.findall(r"\[\[\s*([ABab])\s*\]\]", text))
    if len(bracket) == 1:
        return bracket.pop().upper()
    core = text.strip().strip(" \t\r\n.:!*_`'\"()[]").lower()
    if core in ("a", "b"):
        return core.upper()
    letters = set(re.findall(r"\b([AB])\b", text))
    return letters.pop() if len(letters) == 1 else None


def parse_score(text: str, lo: float, hi: float) -> float | None:
    """The one score in [lo, hi] a reply states, or None when absent, ambiguous or out of range.

    ``[[7]]`` wins; otherwise the reply must name exactly one distinct number that is not a
    denominator ("8/10" and "8 out of 10" give 8; "on a scale of 1 to 10, 7" is ambiguous).
    """
    bracket = re.findall(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]", text)
    if bracket:
        values = {float(v) for v in bracket}
    else:
        values = set()
        for m in _NUMBER.finditer(text):
            before = text[: m.start()].rstrip()
            if before.endswith("/") or before.lower().endswith("out of"):
                continue
            values.add(float(m.group()))
    if len(values) != 1:
        return None
    v = values.pop()
    return v if lo <= v <= hi else None


class LLMJudge(Judge):
    """Pairwise or scoring judge over HTTP; see the module docstring."""

    def __init__(
        self,
        config: LLMJudgeConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> None:
        if not isinstance(config, LLMJudgeConfig):
            raise JudgeError(f"judge: expected an LLMJudgeConfig, got {type(config).__name__}")
        _read_key(config.api_key_env)  # fail now, before any work, when the variable is missing
        super().__init__(
            extra_counters=(
                "requests",
                "retries",
                "timeouts",
                "http_errors",
                "connection_errors",
                "latency_s_total",
                "latency_s_max",
                "comparisons",
                "identical_skipped",
            )
        )
        self.config = config
        self.url = config.base_url + "/chat/completions"
        self._sleep = sleep
        self._opener = opener or urllib.request.build_opener()
        self._rng = random.Random(config.seed)

    @classmethod
    def from_config(cls, config: LLMJudgeConfig, **kwargs: Any) -> LLMJudge:
        return cls(config, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return f"LLMJudge(url={self.url!r}, model={c.model!r}, mode={c.mode!r}, api_key_env={c.api_key_env!r})"

    def stats(self) -> dict[str, float]:
        out = super().stats()
        ok = out["requests"] - out["timeouts"] - out["connection_errors"] - out["http_errors"]
        out["latency_s_mean"] = out["latency_s_total"] / ok if ok > 0 else 0.0
        return out

    # ------------------------------------------------------------------------------ HTTP
    def _backoff(self, attempt: int) -> float:
        c = self.config
        delay = min(c.backoff_max_s, c.backoff_s * 2.0**attempt)
        if c.jitter:
            with self._lock:
                u = self._rng.random()
            delay *= 1.0 + c.jitter * (2.0 * u - 1.0)
        return delay

    def _post(self, body: bytes, headers: dict[str, str], abort: threading.Event) -> Any:
        """One question, retried; returns the reply text, None (bad envelope) or _FAILED.

        ``abort`` is set by the first fatal error (401/403/404) so queued questions are not sent.
        """
        c = self.config
        for attempt in range(c.max_retries + 1):
            if abort.is_set():
                return _FAILED
            self._count("requests")
            t0 = time.monotonic()
            what = ""
            asked: float | None = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self._opener.open(req, timeout=c.timeout_s) as resp:
                    raw = resp.read()
                dt = time.monotonic() - t0
                self._count("latency_s_total", dt)
                self._count_max("latency_s_max", dt)
                return _content(raw)
            except urllib.error.HTTPError as err:
                self._count("http_errors")
                status = err.code
                asked = retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
                err.close()
                if status in _FATAL_STATUS:
                    abort.set()
                    hint = (
                        f" (check the key in ${c.api_key_env})"
                        if status in (401, 403) and c.api_key_env
                        else ""
                    )
                    raise JudgeError(f"judge: HTTP {status} from {self.url}{hint}") from None
                if not (status >= 500 or status in _RETRY_4XX):
                    log.warning(
                        "judge request to %s failed with HTTP %d (not retried)", self.url, status
                    )
                    return _FAILED
                what = f"HTTP {status}"
            except TimeoutError:
                self._count("timeouts")
                what = "timeout"
            except urllib.error.URLError as err:
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    self._count("timeouts")
                    what = "timeout"
                else:
                    self._count("connection_errors")
                    what = f"connection error ({type(err.reason).__name__})"
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                self._count("connection_errors")
                what = f"connection error ({type(err).__name__})"
            if attempt < c.max_retries:
                delay = self._backoff(attempt)
                if asked is not None:  # the server said how long to wait
                    delay = max(delay, min(asked, c.retry_after_max_s))
                self._count("retries")
                log.warning(
                    "judge request to %s: %s; retry %d/%d in %.3g s",
                    self.url,
                    what,
                    attempt + 1,
                    c.max_retries,
                    delay,
                )
                self._sleep(delay)
            else:
                log.warning(
                    "judge request to %s: %s; giving up after %d attempts",
                    self.url,
                    what,
                    attempt + 1,
                )
        return _FAILED

    def _ask_all(self, contents: list[str]) -> list[Any]:
        """Reply texts (or None / _FAILED) of many questions, ``concurrency`` at a time."""
        if not contents:
            return []
        c = self.config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = _read_key(c.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        system = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        bodies = [
            json.dumps(
                {
                    "model": c.model,
                    "messages": [*system, {"role": "user", "content": text}],
                    "temperature": c.temperature,
                    "max_tokens": c.max_tokens,
                }
            ).encode()
            for text in contents
        ]
        abort = threading.Event()
        with ThreadPoolExecutor(max_workers=min(c.concurrency, len(bodies))) as pool:
            futures = [pool.submit(self._post, b, headers, abort) for b in bodies]
            try:
                return [f.result() for f in futures]
            except BaseException:
                abort.set()
                for f in futures:
                    f.cancel()
                raise

    # ------------------------------------------------------------------------- verdicts
    def _pairwise_prompt(self, prompt: str, a: str, b: str) -> str:
        return self.config.pairwise_template.format(prompt=prompt, response_a=a, response_b=b)

    def _scoring_prompt(self, prompt: str, response: str) -> str:
        c = self.config
        return c.scoring_template.format(
            prompt=prompt,
            response=response,
            min_score=f"{c.min_score:g}",
            max_score=f"{c.max_score:g}",
        )

    def _verdict(self, reply: Any) -> str | None:
        if reply is _FAILED:
            self._count("failures")
            return None
        v = None if reply is None else parse_pairwise(reply)
        if v is None:
            self._count("unparseable")
        return v

    def _compare_pairs(self, triples: list[tuple[str, str, str]]) -> np.ndarray:
        """P(a beats b) for (prompt, a, b) triples, both orders asked; NaN if either fails."""
        out = np.full(len(triples), np.nan)
        asked: list[int] = []
        contents: list[str] = []
        for i, (p, a, b) in enumerate(triples):
            if a == b:
                self._count("identical_skipped")
                out[i] = 0.5
                continue
            asked.append(i)
            contents += [self._pairwise_prompt(p, a, b), self._pairwise_prompt(p, b, a)]
        self._count("comparisons", len(asked))
        replies = self._ask_all(contents)
        for k, i in enumerate(asked):
            v1, v2 = self._verdict(replies[2 * k]), self._verdict(replies[2 * k + 1])
            if v1 is not None and v2 is not None:
                out[i] = ((v1 == "A") + (v2 == "B")) / 2.0
        return out

    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        _require_text(prompts, responses)
        c = self.config
        if c.mode == "scoring":
            replies = self._ask_all(
                [self._scoring_prompt(p, r) for p, r in zip(prompts, responses)]
            )
            out = np.full(len(prompts), np.nan)
            for i, reply in enumerate(replies):
                if reply is _FAILED:
                    self._count("failures")
                    continue
                v = None if reply is None else parse_score(reply, c.min_score, c.max_score)
                if v is None:
                    self._count("unparseable")
                else:
                    out[i] = v
            return out
        # pairwise: round robin among the responses that share a prompt
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        triples, index = [], []
        for p, idx in groups.items():
            for x in range(len(idx)):
                for y in range(x + 1, len(idx)):
                    triples.append((p, responses[idx[x]], responses[idx[y]]))
                    index.append((idx[x], idx[y]))
        probs = self._compare_pairs(triples)
        wins = np.zeros(len(prompts))
        counts = np.zeros(len(prompts))
        for (i, j), pr in zip(index, probs):
            if not np.isnan(pr):
                wins[i] += pr
                wins[j] += 1.0 - pr
                counts[i] += 1
                counts[j] += 1
        lonely = sum(1 for idx in groups.values() if len(idx) == 1)
        self._count("failures", lonely)  # nothing to compare against in pairwise mode
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, wins / counts, np.nan)

    def compare_batch(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[Response],
        responses_b: Sequence[Response],
    ) -> np.ndarray:
        """P(a beats b) per item: both orders asked in pairwise mode; from scores otherwise."""
        if self.config.mode != "pairwise":
            return super().compare_batch(prompts, responses_a, responses_b)
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise JudgeError(
                f"judge: got {len(prompts)} prompts, {len(responses_a)} and {len(responses_b)} responses"
            )
        _require_text(prompts, [*responses_a, *responses_b])
        self._count("calls")
        self._count("items", len(prompts))
        return self._compare_pairs(list(zip(prompts, responses_a, responses_b)))


def _read_key(name: str | None) -> str | None:
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise JudgeError(
            f"judge.api_key_env: environment variable {name} is not set (it must hold the API key)"
        )
    return key


def _require_text(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    for i, x in enumerate([*prompts, *responses]):
        if not isinstance(x, str):
            raise JudgeError(
                f"judge: the LLM judge needs text; item {i} is a {type(x).__name__} (decode token ids first)"
            )


def _content(raw: bytes) -> str | None:
    """``choices[0].message.content`` of a chat-completions reply, or None if it is malformed."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
