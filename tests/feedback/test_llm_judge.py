"""LLM judge against a real HTTP server on 127.0.0.1 speaking the chat-completions schema.

The server (stdlib ThreadingHTTPServer, port 0, one per test) is a position-biased fake judge:
each response carries its true quality as "answer <q>", and a pairwise question is answered "A"
unless B is better by more than BIAS -- so a single order is wrong on close calls and only the
two-order average is right. Per-test behaviours inject timeouts, 5xx, 4xx and junk replies.

Retries are the openai client's: its back-off after a timeout or connection error is ~0.5 s, so
those tests allow one retry; replies that fail with a status carry a small ``retry-after-ms``
header, which the client honours instead of its back-off, so they retry in milliseconds. Waits
are only checked from below (the server saw the retry no earlier than it asked).
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
    """A chat-completions server; ``behavior(n, body)`` -> (status, reply text or raw bytes,
    delay_s), or that plus a dict of extra response headers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.times: list[float] = []  # time.monotonic() at each request's arrival
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
                    fake.times.append(time.monotonic())
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


def judge_for(server, **kw) -> LLMJudge:
    cfg = dict(
        kind="llm",
        base_url=server.url,
        model="judge-model",
        # generous: on a busy machine a local reply can take a while; the timeout tests set
        # their own, with replies delayed far beyond it
        timeout_s=5.0,
        max_retries=2,
        concurrency=4,
    )
    cfg.update(kw)
    return make_judge(cfg)


def judge_warnings(caplog) -> list[str]:
    """The judge's own log lines (the openai client logs under its own name)."""
    return [r.getMessage() for r in caplog.records if r.name == "jaxselm.feedback.llm"]


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
        b"",
        b"[]",
        b'{"choices": []}',
        b'{"choices": "x"}',
        b'{"choices": [{"message": {"content": null}}]}',
        b'{"choices": [{"message": {"content": 5}}]}',
    ]
    server.behavior = lambda n, body: (200, junk[n], 0.0)
    judge = judge_for(server, mode="scoring", concurrency=1)
    s = judge.score(["p"] * len(junk), [f"answer {i}" for i in range(len(junk))])
    assert np.isnan(s).all()
    st = judge.stats()
    assert st["unparseable"] == len(junk) and st["failures"] == 0 and st["retries"] == 0
    assert server.count == len(junk)


# --------------------------------------------------------------------- failures, retries
def test_timeouts_are_retried_then_succeed(server):
    server.behavior = lambda n, body: (200, "8", 4.0 if n < 1 else 0.0)
    judge = judge_for(server, mode="scoring", max_retries=1, timeout_s=1.0)
    np.testing.assert_array_equal(judge.score(["p"], ["answer 8"]), [8.0])
    st = judge.stats()
    assert st["timeouts"] == 1 and st["retries"] == 1 and st["requests"] == 2
    assert st["failures"] == 0 and server.count == 2


def test_persistent_timeouts_give_nan_and_count_a_failure(server, caplog):
    server.behavior = lambda n, body: (200, "8", 4.0)
    judge = judge_for(server, mode="scoring", max_retries=1, timeout_s=1.0)
    assert np.isnan(judge.score(["p"], ["answer 8"])).all()
    st = judge.stats()
    assert st["timeouts"] == 2 and st["requests"] == 2 and st["retries"] == 1
    assert st["failures"] == 1 and st["latency_s_mean"] == 0.0
    (line,) = judge_warnings(caplog)  # one line per failed question, not one per attempt
    assert server.url in line and "timed out" in line and "2 attempt" in line


def test_5xx_retried_then_success(server):
    # The client retries 5xx after the wait the reply asks for (10 ms), not its 0.5 s+ back-off.
    server.behavior = lambda n, body: (500 if n < 3 else 200, "6", 0.0, {"retry-after-ms": "10"})
    judge = judge_for(server, mode="scoring", max_retries=3, concurrency=1)
    np.testing.assert_array_equal(judge.score(["p"], ["answer 6"]), [6.0])
    st = judge.stats()
    assert st["http_errors"] == 3 and st["retries"] == 3 and st["requests"] == 4
    assert st["failures"] == 0 and server.count == 4


def test_persistent_5xx_and_429_give_nan_after_max_retries(server, caplog):
    statuses = [429, 503, 502]
    server.behavior = lambda n, body: (statuses[n], "busy", 0.0, {"retry-after-ms": "10"})
    judge = judge_for(server, mode="scoring", max_retries=2)
    assert np.isnan(judge.score(["p"], ["answer 6"])).all()
    st = judge.stats()
    assert st["http_errors"] == 3 and st["retries"] == 2 and st["requests"] == 3
    assert st["failures"] == 1 and server.count == 3
    (line,) = judge_warnings(caplog)
    assert server.url in line and "HTTP 502" in line and "3 attempt" in line


@pytest.mark.parametrize("header, value", [("retry-after-ms", "700"), ("Retry-After", "0.7")])
def test_retry_after_is_honoured(server, header, value):
    """A rate-limited API says how long to wait (429 + retry-after-ms or Retry-After): the client
    waits that long instead of its own back-off, which is at most 0.5 s before a first retry."""
    server.behavior = lambda n, body: (429, "", 0.0, {header: value}) if n == 0 else (200, "7", 0.0)
    judge = judge_for(server, mode="scoring", max_retries=1)
    np.testing.assert_array_equal(judge.score(["p"], ["answer 7"]), [7.0])
    assert server.count == 2 and server.times[1] - server.times[0] >= 0.7  # a lower bound only
    st = judge.stats()
    assert st["http_errors"] == 1 and st["retries"] == 1 and st["failures"] == 0


@pytest.mark.parametrize("status", [401, 403, 404])
def test_401_403_404_are_not_retried_and_raise_at_once(server, monkeypatch, status):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    server.behavior = lambda n, body: (status, "denied", 0.0, {"retry-after-ms": "10"})
    judge = judge_for(server, mode="scoring", api_key_env="JUDGE_TEST_KEY", concurrency=1)
    with pytest.raises(JudgeError) as err:
        judge.score(["p"] * 5, [f"answer {i}" for i in range(5)])
    msg = str(err.value)
    assert msg.startswith(f"judge: HTTP {status} from {server.url}/chat/completions")
    assert "\n" not in msg and SECRET not in msg
    assert ("JUDGE_TEST_KEY" in msg) == (status != 404)
    # Not retried, and the four questions still queued were never sent.
    assert server.count == 1 and judge.stats()["retries"] == 0 and judge.stats()["requests"] == 1


def test_other_4xx_is_not_retried_and_drops_the_item(server, caplog):
    server.behavior = lambda n, body: (400, "context too long", 0.0, {"retry-after-ms": "10"})
    judge = judge_for(server, mode="scoring")
    assert np.isnan(judge.score(["p"], ["answer 1"])).all()
    st = judge.stats()
    assert server.count == 1 and st["retries"] == 0 and st["failures"] == 1
    assert st["http_errors"] == 1
    (line,) = judge_warnings(caplog)
    assert "HTTP 400" in line and "1 attempt" in line


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_server_stops_at_the_first_question(caplog):
    """Nothing ever answered: a wrong URL or a server that is down. One line, at once (after the
    client's retries of the first question), the queued questions not sent, no warning flood."""
    url = _dead_url()
    judge = make_judge(
        dict(kind="llm", base_url=url, model="m", mode="scoring", max_retries=1, concurrency=2)
    )
    with pytest.raises(JudgeError) as err:
        judge.score(["p"] * 40, [f"answer {i}" for i in range(40)])
    msg = str(err.value)
    assert msg.startswith(f"judge: cannot reach {url}/chat/completions (connection error")
    assert "is the server running?" in msg and len(msg.splitlines()) == 1
    st = judge.stats()
    assert st["requests"] <= 2 * 2 * 2  # the questions in flight (2 workers x 2 attempts), no more
    assert judge_warnings(caplog) == []


def test_connection_lost_after_answers_is_retried_and_counted(server, caplog):
    """Once the server has answered, a connection error is one failed item (NaN, a warning)."""
    judge = judge_for(server, mode="scoring", max_retries=1)
    assert not np.isnan(judge.score(["p"], ["answer 1"])).any()
    server.close()
    server.close = lambda: None  # the fixture's close: already done
    assert np.isnan(judge.score(["p"], ["answer 1"])).all()
    st = judge.stats()
    assert st["connection_errors"] == 2 and st["retries"] == 1 and st["failures"] == 1
    (line,) = judge_warnings(caplog)
    assert server.url in line and "connection error" in line


# --------------------------------------------------------------------- secrets, limits
def test_api_key_from_env_sent_but_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    statuses = [500, 200, 400]  # a retry, then a failed question: the client and the judge log
    server.behavior = lambda n, body: (statuses[n], "A", 0.0, {"retry-after-ms": "10"})
    cfg = parse_judge_config(
        dict(
            kind="llm",
            base_url=server.url,
            model="m",
            api_key_env="JUDGE_TEST_KEY",
            concurrency=1,
        )
    )
    judge = make_judge(cfg)
    assert np.isnan(judge.compare("p", "answer 9", "answer 1"))
    assert [h["authorization"] for h in server.headers] == [f"Bearer {SECRET}"] * 3
    assert judge_warnings(caplog) and any(r.name.startswith("openai") for r in caplog.records)
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


def test_without_api_key_env_no_key_from_the_environment_is_sent(server, monkeypatch):
    # The openai client would fall back to $OPENAI_API_KEY; the judge sends a placeholder instead.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judge = judge_for(server)
    assert judge.compare("p", "answer 9", "answer 1") == 1.0
    assert {h.get("authorization") for h in server.headers} == {"Bearer EMPTY"}


def test_missing_api_key_variable_fails_before_any_request(server, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(
        JudgeError, match=r"^judge\.api_key_env: environment variable JUDGE_TEST_KEY is not set"
    ):
        make_judge(dict(kind="llm", base_url=server.url, model="m", api_key_env="JUDGE_TEST_KEY"))
    assert server.count == 0


def test_concurrency_limit_is_respected(server):
    server.behavior = lambda n, body: (200, "5", 0.3)
    judge = judge_for(server, mode="scoring", concurrency=3)
    s = judge.score(["p"] * 9, [f"answer {i}" for i in range(1, 10)])
    np.testing.assert_array_equal(s, [5.0] * 9)
    assert server.max_inflight == 3
    st = judge.stats()
    assert st["latency_s_mean"] > 0 and st["latency_s_max"] >= st["latency_s_mean"]


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
        (dict(temperature=-0.5), r"^judge\.temperature: must be >= 0 \(got -0\.5\)$"),
        (dict(max_tokens=0), r"^judge\.max_tokens: must be >= 1 \(got 0\)$"),
        (dict(max_retries=-1), r"^judge\.max_retries: must be >= 0 \(got -1\)$"),
        # the hand-written back-off is gone: the openai client owns retries now
        (dict(backoff_s=1.0), r"^judge\.backoff_s: unknown key"),
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
