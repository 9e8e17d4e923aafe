"""LLM judge against a real HTTP server on 127.0.0.1 speaking the chat-completions schema.

The server (stdlib ThreadingHTTPServer, port 0, one per test) is a position-biased fake judge:
each response carries its true quality as "answer <q>", and a pairwise question is answered "A"
unless B is better by more than BIAS -- so a single order is wrong on close calls and only the
two-order average is right. Per-test behaviours inject timeouts, 5xx, 4xx and junk replies.
Back-off sleeps are recorded by an injected ``sleep`` (delays are checked, wall time never is).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jaxselm.errors import ConfigError, JaxselmError, JudgeError
from jaxselm.feedback import (
    LLMJudge,
    LLMJudgeConfig,
    make_judge,
    parse_judge_config,
    parse_pairwise,
    parse_score,
)

BIAS = 2  # the fake judge favours position A by this many quality points
SECRET = "sk-test-SECRET-0123456789"


def quality(text: str) -> int:
    return int(re.search(r"answer (\d+)", text).group(1))


def biased_reply(user: str) -> str:
    """The fake judge's verdict: scoring -> 'Score: q/10'; pairwise -> position-biased A/B."""
    if "[The start of the response]" in user:
        return f"Score: {quality(user.split('[The start of the response]')[1])}/10"
    a = user.split("[The start of response A]")[1].split("[The end of response A]")[0]
    b = user.split("[The start of response B]")[1].split("[The end of response B]")[0]
    return "A" if quality(a) + BIAS >= quality(b) else "B"


class FakeLLM:
    """A chat-completions server; ``behavior(n, body)`` -> (status, reply text or raw bytes, delay_s)
    or that plus a dict of extra response headers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.behavior = lambda n, body: (200, biased_reply(body["messages"][-1]["content"]), 0.0)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    n = len(fake.bodies)
                    fake.bodies.append(body)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    fake.path = self.path
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    status, reply, delay, *extra = fake.behavior(n, body)
                    time.sleep(delay)
                    if isinstance(reply, bytes):
                        payload = reply
                    else:
                        payload = json.dumps(
                            {
                                "id": f"c{n}",
                                "object": "chat.completion",
                                "choices": [
                                    {
                                        "index": 0,
                                        "message": {"role": "assistant", "content": reply},
                                        "finish_reason": "stop",
                                    }
                                ],
                            }
                        ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with fake.lock:
                        fake.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
        )
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def users(self) -> list[str]:
        return [b["messages"][-1]["content"] for b in self.bodies]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    fake = FakeLLM()
    yield fake
    fake.close()


def judge_for(server, sleeps=None, **kw) -> LLMJudge:
    cfg = dict(
        kind="llm",
        base_url=server.url,
        model="judge-model",
        timeout_s=0.25,
        max_retries=2,
        backoff_s=0.01,
        backoff_max_s=1.0,
        jitter=0.0,
        concurrency=4,
    )
    cfg.update(kw)
    sleeps = [] if sleeps is None else sleeps
    return make_judge(cfg, sleep=sleeps.append)


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text, want",
    [
        ("A", "A"),
        (" b. ", "B"),
        ("**A**", "A"),
        ("[[B]]", "B"),
        ("Response B is better.", "B"),
        ("My verdict: [[A]]", "A"),
        ("(a)", "A"),
        ("A or B", None),
        ("", None),
        ("Both are fine", None),
        ("C", None),
        ("A good answer; I pick B", None),
    ],
)
def test_parse_pairwise(text, want):
    assert parse_pairwise(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("7", 7.0),
        ("Score: 8/10", 8.0),
        ("I rate it 6 out of 10.", 6.0),
        ("Rating: [[9]]", 9.0),
        ("  3.5 ", 3.5),
        ("10", 10.0),
        ("11", None),
        ("0", None),
        ("on a scale of 1 to 10, 7", None),
        ("great!", None),
        ("-3", None),
    ],
)
def test_parse_score(text, want):
    assert parse_score(text, 1.0, 10.0) == want


# ----------------------------------------------------------------------------- pairwise
def test_pairwise_asks_both_orders_and_cancels_position_bias(server):
    judge = judge_for(server)
    p = "Which number is biggest?"
    # Close call (4 vs 5, within BIAS): each single order just says "A"; averaged, a tie both ways.
    assert judge.compare(p, "answer 5", "answer 4") == 0.5
    assert judge.compare(p, "answer 4", "answer 5") == 0.5
    # Clear calls: right and symmetric.
    got = judge.compare_batch([p, p], ["answer 9", "answer 1"], ["answer 1", "answer 9"])
    np.testing.assert_array_equal(got, [1.0, 0.0])
    # Both orders went over the wire, responses swapped, on the chat-completions schema.
    assert server.count == 8
    shown = [
        (
            quality(u.split("[The start of response A]")[1].split("[The end of response A]")[0]),
            quality(u.split("[The start of response B]")[1]),
        )
        for u in server.users()
    ]
    assert sorted(shown[:2]) == [(4, 5), (5, 4)]  # the first compare, in both orders
    body = server.bodies[0]
    assert server.path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 16
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "authorization" not in server.headers[0]  # no api_key_env configured
    st = judge.stats()
    assert (
        st["requests"] == 8
        and st["comparisons"] == 4
        and st["unparseable"] == 0
        and st["failures"] == 0
    )


def test_pairwise_score_ranks_responses_round_robin(server):
    judge = judge_for(server)
    prompts = ["p", "p", "p", "q", "r", "r"]
    responses = ["answer 1", "answer 9", "answer 5", "answer 3", "answer 2", "answer 2"]
    s = judge.score(prompts, responses)
    # p: 9 beats both, 5 beats 1 (all margins > BIAS); q has nothing to compare with; r: identical.
    np.testing.assert_array_equal(s[:3], [0.0, 1.0, 0.5])
    assert np.isnan(s[3])
    np.testing.assert_array_equal(s[4:], [0.5, 0.5])
    assert server.count == 6  # 3 pairs x 2 orders for p; r's identical pair needs no request
    st = judge.stats()
    assert st["failures"] == 1 and st["identical_skipped"] == 1
    np.testing.assert_array_equal(judge.rank("p", ["answer 2", "answer 8"]), [0.0, 1.0])


# ------------------------------------------------------------------------------ scoring
def test_scoring_mode_and_unparseable_replies_dropped(server):
    replies = {
        "answer 3": "3",
        "answer 7": "Score: 7/10",
        "answer 4": "I cannot judge this.",
        "answer 5": "on a scale of 1 to 10, 5",
        "answer 6": "[[6]]",
    }

    def behavior(n, body):
        user = body["messages"][-1]["content"]
        return 200, replies[re.search(r"answer \d+", user).group()], 0.0

    server.behavior = behavior
    judge = judge_for(server, mode="scoring")
    s = judge.score(["p"] * 5, list(replies))
    np.testing.assert_array_equal(s[[0, 1, 4]], [3.0, 7.0, 6.0])
    assert np.isnan(s[2]) and np.isnan(s[3])
    st = judge.stats()
    assert st["unparseable"] == 2 and st["requests"] == 5 and st["retries"] == 0  # never retried
    assert "from 1 (worst) to 10 (best)" in server.users()[0]
    # compare in scoring mode is derived from the scores
    assert judge.compare("p", "answer 7", "answer 3") == 1.0


def test_junk_http_bodies_are_unparseable(server):
    junk = [
        b"not json at all",
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": null}}]}',
    ]
    server.behavior = lambda n, body: (200, junk[n], 0.0)
    judge = judge_for(server, mode="scoring", concurrency=1)
    s = judge.score(["p"] * 3, ["answer 1", "answer 2", "answer 3"])
    assert np.isnan(s).all()
    assert judge.stats()["unparseable"] == 3 and server.count == 3


# --------------------------------------------------------------------- failures, retries
def test_timeouts_are_retried_then_succeed(server):
    server.behavior = lambda n, body: (200, "8", 0.6 if n < 2 else 0.0)  # client timeout is 0.25 s
    sleeps: list[float] = []
    judge = judge_for(server, sleeps, mode="scoring")
    np.testing.assert_array_equal(judge.score(["p"], ["answer 8"]), [8.0])
    st = judge.stats()
    assert (
        st["timeouts"] == 2 and st["retries"] == 2 and st["requests"] == 3 and st["failures"] == 0
    )
    assert sleeps == [0.01, 0.02]  # exponential back-off


def test_retry_after_is_honoured_up_to_its_cap(server):
    """A rate-limited API says how long to wait (429 + Retry-After): the judge waits that long
    instead of its shorter back-off, but never longer than retry_after_max_s; an unreadable
    header falls back to the back-off."""
    headers = [{"Retry-After": "0.5"}, {"Retry-After": "3600"}, {"Retry-After": "soon"}]
    server.behavior = lambda n, body: ((429, "", 0.0, headers[n]) if n < 3 else (200, "7", 0.0))
    sleeps: list[float] = []
    judge = judge_for(server, sleeps, mode="scoring", retry_after_max_s=2.0, max_retries=3)
    np.testing.assert_array_equal(judge.score(["p"], ["answer 7"]), [7.0])
    assert sleeps == [0.5, 2.0, 0.04]  # asked 0.5 s; asked an hour, capped; back-off 0.01 * 2**2


def test_retry_after_header_forms():
    from jaxselm.feedback.llm import retry_after_seconds

    assert retry_after_seconds("120") == 120.0 and retry_after_seconds(" 1.5 ") == 1.5
    assert retry_after_seconds("-3") == 0.0
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == 30.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0  # in the past
    for bad in (None, "", "soon", "nan"):
        assert retry_after_seconds(bad) is None


def test_persistent_timeouts_give_nan_and_count_a_failure(server):
    server.behavior = lambda n, body: (200, "8", 0.6)
    judge = judge_for(server, mode="scoring", max_retries=1)
    s = judge.score(["p"], ["answer 8"])
    assert np.isnan(s).all()
    st = judge.stats()
    assert st["timeouts"] == 2 and st["requests"] == 2 and st["failures"] == 1


def test_5xx_retried_with_exponential_backoff_then_success(server):
    server.behavior = lambda n, body: (500 if n < 3 else 200, "6", 0.0)
    sleeps: list[float] = []
    judge = judge_for(
        server,
        sleeps,
        mode="scoring",
        max_retries=3,
        backoff_s=0.05,
        backoff_max_s=0.15,
        concurrency=1,
    )
    np.testing.assert_array_equal(judge.score(["p"], ["answer 6"]), [6.0])
    assert sleeps == [0.05, 0.1, 0.15]  # doubled each time, capped at backoff_max_s
    st = judge.stats()
    assert st["http_errors"] == 3 and st["requests"] == 4 and st["failures"] == 0


def test_jittered_backoff_is_seeded_and_bounded(server):
    def delays(seed):
        server.behavior = lambda n, body: (503, "", 0.0)
        sleeps: list[float] = []
        judge = judge_for(
            server,
            sleeps,
            mode="scoring",
            max_retries=3,
            backoff_s=0.1,
            jitter=0.5,
            seed=seed,
            concurrency=1,
        )
        assert np.isnan(judge.score(["p"], ["answer 1"])).all()
        return sleeps

    a, b, c = delays(1), delays(1), delays(2)
    assert a == b and a != c
    for k, d in enumerate(a):
        assert 0.5 * 0.1 * 2**k <= d <= 1.5 * 0.1 * 2**k


def test_401_is_not_retried_and_raises(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    server.behavior = lambda n, body: (401, "unauthorized", 0.0)
    judge = judge_for(server, api_key_env="JUDGE_TEST_KEY", concurrency=1)
    with pytest.raises(JudgeError) as err:
        judge.compare("p", "answer 1", "answer 2")
    msg = str(err.value)
    assert "\n" not in msg and "401" in msg and "JUDGE_TEST_KEY" in msg and SECRET not in msg
    assert server.count == 1 and judge.stats()["retries"] == 0


def test_other_4xx_is_not_retried_and_drops_the_item(server):
    server.behavior = lambda n, body: (400, "context too long", 0.0)
    judge = judge_for(server, mode="scoring")
    assert np.isnan(judge.score(["p"], ["answer 1"])).all()
    st = judge.stats()
    assert (
        server.count == 1 and st["retries"] == 0 and st["failures"] == 1 and st["http_errors"] == 1
    )


def test_connection_refused_is_retried_and_counted():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    judge = make_judge(
        dict(
            kind="llm",
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            mode="scoring",
            max_retries=2,
            backoff_s=0.01,
            jitter=0.0,
            timeout_s=0.25,
        ),
        sleep=sleeps.append,
    )
    assert np.isnan(judge.score(["p"], ["answer 1"])).all()
    st = judge.stats()
    assert st["connection_errors"] == 3 and st["failures"] == 1 and len(sleeps) == 2


# --------------------------------------------------------------------- secrets, limits
def test_api_key_from_env_sent_but_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    server.behavior = lambda n, body: (500 if n == 0 else 200, "A", 0.0)  # one retry -> a log line
    cfg = parse_judge_config(
        dict(
            kind="llm",
            base_url=server.url,
            model="m",
            api_key_env="JUDGE_TEST_KEY",
            backoff_s=0.0,
            jitter=0.0,
            concurrency=1,
        )
    )
    judge = make_judge(cfg, sleep=lambda s: None)
    judge.compare("p", "answer 9", "answer 1")
    assert {h["authorization"] for h in server.headers} == {f"Bearer {SECRET}"}
    assert "retry" in caplog.text
    for shown in (
        repr(judge),
        str(judge),
        repr(cfg),
        cfg.model_dump_json(),
        str(judge.stats()),
        caplog.text,
        str(vars(judge)),
    ):
        assert SECRET not in shown


def test_missing_api_key_variable_fails_before_any_request(server, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(
        JudgeError, match=r"^judge\.api_key_env: environment variable JUDGE_TEST_KEY is not set"
    ):
        make_judge(dict(kind="llm", base_url=server.url, model="m", api_key_env="JUDGE_TEST_KEY"))
    assert server.count == 0


def test_concurrency_limit_is_respected(server):
    server.behavior = lambda n, body: (200, "5", 0.15)
    judge = judge_for(server, mode="scoring", concurrency=3)
    s = judge.score(["p"] * 9, [f"answer {i}" for i in range(1, 10)])
    np.testing.assert_array_equal(s, [5.0] * 9)
    assert server.max_inflight == 3
    assert judge.stats()["latency_s_mean"] > 0


def test_llm_judge_needs_text():
    judge = make_judge(dict(kind="llm", base_url="http://127.0.0.1:9/v1", model="m"))
    with pytest.raises(JudgeError, match="needs text"):
        judge.score(["p"], [(1, 2, 3)])


# -------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "override, match",
    [
        (dict(base_url="localhost:8000"), r"^judge\.base_url: must be an http\(s\) URL"),
        (dict(base_url="ftp://host/v1"), r"^judge\.base_url: must be an http\(s\) URL"),
        (dict(base_url="http://host:port/v1"), r"^judge\.base_url: has a malformed port"),
        (dict(timeout_s=0), r"^judge\.timeout_s: must be > 0"),
        (dict(mode="listwise"), r"^judge\.mode: "),
        (dict(concurrency=0), r"^judge\.concurrency: must be >= 1"),
        (
            dict(pairwise_template="{prompt} {response_a}"),
            r"^judge\.pairwise_template: missing placeholder \{response_b\}",
        ),
        (
            dict(scoring_template="{prompt} {response} {score}"),
            r"^judge\.scoring_template: unknown placeholder \{score\}",
        ),
        (dict(temperatur=0.0), r"^judge\.temperatur: unknown key"),
    ],
)
def test_bad_llm_configs_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_judge(
            {"kind": "llm", "base_url": "http://localhost:8000/v1", "model": "m", **override}
        )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        dict(base_url=f"https://user:{SECRET}@api.example.com/v1"),
        dict(api_key_env=SECRET),
    ],
)
def test_secrets_pasted_into_the_config_are_not_echoed(override):
    with pytest.raises(JaxselmError) as err:
        LLMJudgeConfig(**{"base_url": "http://localhost:8000/v1", "model": "m", **override})
    assert SECRET not in str(err.value) and "\n" not in str(err.value)
