"""LLM judge over an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp, APIs).

Each question is one ``client.chat.completions.create(model, messages=[system?, user],
temperature, max_tokens)`` call of the official ``openai`` client, which every such server
documents; the verdict is read from ``choices[0].message.content``. Two modes
(:class:`~jaxselm.feedback.config.LLMJudgeConfig`):

* ``pairwise`` -- "which of A and B is better?". LLM judges prefer one position (often the
  first), so every comparison is asked in **both orders** and the verdicts averaged:
  P(a beats b) = ([a shown first and A chosen] + [b shown first and B chosen]) / 2. A judge that
  always answers "A" thus yields 0.5, a tie, instead of a spurious preference. ``score`` ranks
  the responses sharing a prompt by their mean win probability against each other (round robin;
  identical responses tie without a request); a response alone with its prompt cannot be scored.
* ``scoring`` -- "rate this from min_score to max_score"; the score is parsed from the reply.

Failure handling, so a flaky server costs items, not runs:

* timeouts and retries are the client's job: each request may take ``timeout_s``; timeouts,
  connection errors, 408 / 409 / 429 and 5xx are retried up to ``max_retries`` times after the
  client's exponential back-off (0.5 s doubling up to 8 s, jittered), or after the wait that a
  ``retry-after-ms`` / ``Retry-After`` header asks for (rate-limited APIs send it with 429). A
  question that still fails is NaN, counted in ``failures``, with one warning naming the URL and
  the reason;
* a connection error before the server has ever answered (refused, unknown host: a wrong
  ``base_url`` or a server that is not up) raises a one-line JudgeError at once, so a run stops at
  its first judge call instead of failing every question; once it has answered, connection errors
  are retried and counted like timeouts;
* 401/403/404 mean every request will fail the same way (bad key, wrong URL or model): they raise
  a one-line JudgeError at once and the questions still queued are not sent; other 4xx (e.g. 400
  for one over-long prompt) are not retried and mark that item NaN;
* a reply whose verdict cannot be parsed (or a malformed body) is counted (``unparseable``) and
  its item is NaN; the caller drops NaN items (:func:`jaxselm.feedback.pairs.build_pairs` does).

Questions run on a thread pool of ``concurrency`` workers sharing one (thread-safe) client. The
API key is read from the environment variable named by ``api_key_env`` when the judge is built
and handed to the client, which only places it in the ``Authorization: Bearer`` header; it is not
in the judge's repr and never logged (log lines name the URL and the reason only). ``stats()``
counts every HTTP attempt, the client's retries included (requests, retries, timeouts, HTTP and
connection errors, latency).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import openai

try:  # the HTTP library under openai: httpx2 from openai 3 on, httpx before (the same API)
    from httpx2 import TimeoutException
except ImportError:  # pragma: no cover
    from httpx import TimeoutException

from jaxselm.errors import JudgeError
from jaxselm.feedback.base import Judge, Response
from jaxselm.feedback.config import LLMJudgeConfig

log = logging.getLogger(__name__)

_FAILED = object()  # a question that failed for good (after the client's retries, or a 4xx)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
# The key sent when no api_key_env is set: keyless servers ignore it (vLLM's docs use "EMPTY"),
# and an explicit value keeps the client from sending $OPENAI_API_KEY to a server nobody named.
_NO_KEY = "EMPTY"
# The judge's counters beyond the base ones (requests and after: every HTTP attempt).
_COUNTERS = (
    "requests retries timeouts http_errors connection_errors latency_s_total latency_s_max "
    "comparisons identical_skipped"
).split()

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


class _CountingHttpClient(openai.DefaultHttpxClient):
    """The openai client's HTTP client, counting every attempt.

    The openai client retries inside ``create``, so only the HTTP layer sees each attempt, its
    latency and how it failed: every attempt goes through ``send``. ``thread.attempts`` counts
    the attempts of the question the calling thread asks (a question stays on one thread).
    """

    def __init__(self, count: Callable[..., None], count_max: Callable[..., None]) -> None:
        super().__init__()
        self._counter, self._counter_max = count, count_max
        self.thread = threading.local()

    def send(self, request: Any, **kwargs: Any) -> Any:
        self.thread.attempts = getattr(self.thread, "attempts", 0) + 1
        self._counter("requests")
        t0 = time.monotonic()
        try:
            response = super().send(request, **kwargs)
        except TimeoutException:
            self._counter("timeouts")
            raise
        except Exception:
            self._counter("connection_errors")
            raise
        if response.status_code >= 400:
            self._counter("http_errors")
        else:
            dt = time.monotonic() - t0
            self._counter("latency_s_total", dt)
            self._counter_max("latency_s_max", dt)
        return response


class LLMJudge(Judge):
    """Pairwise or scoring judge over HTTP; see the module docstring."""

    def __init__(self, config: LLMJudgeConfig) -> None:
        if not isinstance(config, LLMJudgeConfig):
            raise JudgeError(f"judge: expected an LLMJudgeConfig, got {type(config).__name__}")
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not key:  # fail now, before any work
            raise JudgeError(
                f"judge.api_key_env: environment variable {config.api_key_env} is not set "
                "(it must hold the API key)"
            )
        super().__init__(extra_counters=_COUNTERS)
        self.config = config
        self.url = config.base_url + "/chat/completions"
        # Whether the server has ever answered (any HTTP status): until then a connection error
        # stops the run at once (one line) instead of failing every question with a warning.
        self._reached = False
        # Our own HTTP client, only to count what the openai client does inside (its retries).
        self._http = _CountingHttpClient(self._count, self._count_max)
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=key or _NO_KEY,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
            http_client=self._http,
        )

    @classmethod
    def from_config(cls, config: LLMJudgeConfig, **kwargs: Any) -> LLMJudge:
        return cls(config, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LLMJudge(url={self.url!r}, model={c.model!r}, mode={c.mode!r}, "
            f"api_key_env={c.api_key_env!r})"
        )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        ok = out["requests"] - out["timeouts"] - out["connection_errors"] - out["http_errors"]
        out["latency_s_mean"] = out["latency_s_total"] / ok if ok > 0 else 0.0
        return out

    def check(self) -> None:
        """One ``GET {base_url}/models`` (every OpenAI-compatible server has it) before a run:
        no connection, or a key the server refuses, stops the run now with one line instead of
        after generating an iteration. Any other answer (even 404) shows the server is there."""
        try:
            self._client.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            hint = (
                f" (check the key in ${self.config.api_key_env})" if self.config.api_key_env else ""
            )
            raise JudgeError(
                f"judge: HTTP {err.status_code} from {self.config.base_url}/models{hint}"
            ) from None
        except openai.APIConnectionError as err:
            if isinstance(err, openai.APITimeoutError):
                return  # slow, not absent: the questions have their own timeouts and retries
            raise JudgeError(
                f"judge: cannot reach {self.config.base_url} (connection error, "
                f"{type(err.__cause__).__name__}); is the server running?"
            ) from None
        except (openai.APIStatusError, json.JSONDecodeError):
            pass
        self._reached = True

    # ------------------------------------------------------------------------------ HTTP
    def _ask(self, content: str, abort: threading.Event) -> Any:
        """One question (the client retries it); the reply text, None (no text) or _FAILED.

        ``abort`` is set by the first fatal error (401/403/404) so queued questions are not sent.
        """
        if abort.is_set():
            return _FAILED
        c = self.config
        system = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        self._http.thread.attempts = 0
        try:
            reply = self._client.chat.completions.create(
                model=c.model,
                messages=[*system, {"role": "user", "content": content}],
                temperature=c.temperature,
                max_tokens=c.max_tokens,
            )
        except _FATAL as err:
            abort.set()
            hint = f" (check the key in ${c.api_key_env})" if c.api_key_env else ""
            if err.status_code == 404:
                hint = f" (check base_url and model {c.model!r})"
            raise JudgeError(f"judge: HTTP {err.status_code} from {self.url}{hint}") from None
        except openai.APIStatusError as err:
            self._reached = True
            why = f"HTTP {err.status_code}"
        except openai.APITimeoutError:
            why = f"timed out after {c.timeout_s:g} s"
        except openai.APIConnectionError as err:
            why = f"connection error ({type(err.__cause__).__name__})"
            if not self._reached:  # nothing ever answered: a wrong URL or a server that is down
                abort.set()
                raise JudgeError(
                    f"judge: cannot reach {self.url} ({why} after "
                    f"{self._http.thread.attempts} attempt(s)); is the server running?"
                ) from None
        except json.JSONDecodeError:
            self._reached = True
            return None  # a 2xx reply whose body is not JSON
        else:
            self._reached = True
            return _content(reply)
        finally:
            self._count("retries", max(0, self._http.thread.attempts - 1))
        if abort.is_set():  # the run is stopping on another question's error: no more noise
            return _FAILED
        attempts = self._http.thread.attempts
        log.warning("judge request to %s failed after %d attempt(s): %s", self.url, attempts, why)
        return _FAILED

    def _ask_all(self, contents: list[str]) -> list[Any]:
        """Reply texts (or None / _FAILED) of many questions, ``concurrency`` at a time."""
        if not contents:
            return []
        abort = threading.Event()
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(contents))) as pool:
            futures = [pool.submit(self._ask, text, abort) for text in contents]
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

    def _parsed(self, reply: Any, parse: Callable[[str], Any]) -> Any:
        """The verdict parsed from a reply; None (counted) when it failed or is unparseable."""
        if reply is _FAILED:
            self._count("failures")
            return None
        v = None if reply is None else parse(reply)
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
            v1, v2 = (self._parsed(r, parse_pairwise) for r in replies[2 * k : 2 * k + 2])
            if v1 is not None and v2 is not None:
                out[i] = ((v1 == "A") + (v2 == "B")) / 2.0
        return out

    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        _require_text(prompts, responses)
        c = self.config
        if c.mode == "scoring":
            lo, hi = f"{c.min_score:g}", f"{c.max_score:g}"
            replies = self._ask_all(
                [
                    c.scoring_template.format(prompt=p, response=r, min_score=lo, max_score=hi)
                    for p, r in zip(prompts, responses, strict=True)
                ]
            )
            scores = [
                self._parsed(r, lambda t: parse_score(t, c.min_score, c.max_score)) for r in replies
            ]
            return np.array([np.nan if v is None else v for v in scores], np.float64)
        # pairwise: round robin among the responses that share a prompt
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        triples, index = [], []
        for p, idx in groups.items():
            for i, j in itertools.combinations(idx, 2):
                triples.append((p, responses[i], responses[j]))
                index.append((i, j))
        probs = self._compare_pairs(triples)
        wins = np.zeros(len(prompts))
        counts = np.zeros(len(prompts))
        for (i, j), pr in zip(index, probs, strict=True):
            if not np.isnan(pr):
                wins[i] += pr
                wins[j] += 1.0 - pr
                counts[i] += 1
                counts[j] += 1
        lonely = sum(1 for idx in groups.values() if len(idx) == 1)
        self._count("failures", lonely)  # nothing to compare against in pairwise mode
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, wins / counts, np.nan)

    def _compare(self, prompts: list[str], a: list[Response], b: list[Response]) -> np.ndarray:
        """P(a beats b) per item: both orders asked in pairwise mode; from scores otherwise."""
        if self.config.mode != "pairwise":
            return super()._compare(prompts, a, b)
        _require_text(prompts, [*a, *b])
        self._count("calls")
        self._count("items", len(prompts))
        return self._compare_pairs(list(zip(prompts, a, b, strict=True)))


def _require_text(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    for i, x in enumerate([*prompts, *responses]):
        if not isinstance(x, str):
            raise JudgeError(
                f"judge: the LLM judge needs text; item {i} is a {type(x).__name__} "
                "(decode token ids first)"
            )


def _content(reply: Any) -> str | None:
    """``choices[0].message.content`` of a chat completion, or None when the reply has none."""
    try:
        content = reply.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return content if isinstance(content, str) and content else None
