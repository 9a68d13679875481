"""Running a server: API key, metrics, client disconnects, backpressure, engine failures."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from server_helpers import load_engine, metric, poll_until, serving

LONG = {"prompt": "a", "max_tokens": 50, "ignore_eos": True, "temperature": 0}


class PausableEngine:
    """The real engine whose ``step()`` does nothing while ``paused`` is set.

    The engine thread keeps taking commands (add, abort) meanwhile, so a test can hold requests in
    flight for as long as it needs without depending on how fast the model decodes.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.paused = threading.Event()
        self.fail_next_step = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        if self.fail_next_step.is_set():
            self.fail_next_step.clear()
            raise RuntimeError("injected step failure")
        if self.paused.is_set():
            time.sleep(0.001)
            return []
        return self._engine.step()


@pytest.fixture(scope="module")
def engine(package) -> PausableEngine:
    # 1 MiB of KV: 128 pages, so one request's pages show in the usage ratio.
    return PausableEngine(load_engine(package, kv_cache_bytes=1 << 20, max_num_seqs=1))


@pytest.fixture
def live(engine):
    """A server over ``engine`` admitting one running + one waiting request."""
    engine.paused.clear()
    with serving(engine, max_queue=1) as server:
        yield server
    engine.paused.clear()


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def first_event(response: httpx.Response):
    """The first event and the line iterator, which the caller must keep: a closed iterator closes
    the connection (httpx drops a half-read response's connection)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return line, lines
    raise AssertionError("the stream ended without an event")


def test_api_key_protects_everything_but_health(package):
    with serving(load_engine(package), api_key="sekret") as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for path in ("/v1/models", "/metrics"):
                response = httpx.get(f"{server.url}{path}", headers=headers)
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert response.status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200

        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=good.models.list().data[0].id, prompt="a", max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_metrics_exposes_latencies_queue_kv_and_prefix_cache(live):
    prompt = "The same prompt twice: more than one 16-token page."
    for _ in range(2):
        reply = httpx.post(f"{live.url}/v1/completions", json={"prompt": prompt, "max_tokens": 3,
                                                                "ignore_eos": True}, timeout=60)
        assert reply.status_code == 200
    text = scrape(live.url)
    assert metric(text, "llmc_time_to_first_token_seconds_count") >= 2
    assert metric(text, "llmc_inter_token_latency_seconds_count") >= 4
    assert metric(text, "llmc_e2e_request_latency_seconds_count") >= 2
    assert metric(text, "llmc_requests_finished_total", 'finish_reason="length"') >= 2
    assert metric(text, "llmc_requests_finished_total", 'finish_reason="abort"') >= 0
    assert metric(text, "llmc_num_requests_waiting") == 0
    assert metric(text, "llmc_num_requests_running") == 0
    assert metric(text, "llmc_kv_cache_usage_ratio") == 0
    assert metric(text, "llmc_kv_cache_blocks") == 128
    assert metric(text, "llmc_preemptions_total") >= 0
    assert metric(text, "llmc_generation_tokens_total") >= 6
    assert 0 < metric(text, "llmc_prefix_cache_hit_rate") <= 1  # the second prompt reused the first's pages


def test_client_disconnect_aborts_and_frees_pages(live, engine):
    before = metric(scrape(live.url), "llmc_requests_finished_total", 'finish_reason="abort"')
    with httpx.Client(base_url=live.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            _, lines = first_event(response)
            engine.paused.set()  # hold the request mid-generation, its pages allocated
            text = scrape(live.url)
            assert metric(text, "llmc_kv_cache_usage_ratio") > 0
            assert metric(text, "llmc_num_requests_running") == 1
    # The connection is closed (response and client): the server must abort the request.
    poll_until(lambda: metric(scrape(live.url), "llmc_kv_cache_usage_ratio") == 0, what="KV pages freed")
    text = scrape(live.url)
    assert metric(text, "llmc_num_requests_running") == 0
    assert metric(text, "llmc_requests_finished_total", 'finish_reason="abort"') == before + 1
    engine.paused.clear()
    reply = httpx.post(f"{live.url}/v1/completions", json={"prompt": "b", "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_non_streaming_client_disconnect_aborts(live, engine):
    engine.paused.set()
    with httpx.Client(base_url=live.url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):  # gives up while the request is held, closing the connection
            client.post("/v1/completions", json=LONG)
    poll_until(lambda: metric(scrape(live.url), "llmc_num_requests_waiting") == 0
               and metric(scrape(live.url), "llmc_num_requests_running") == 0, what="request aborted")
    assert metric(scrape(live.url), "llmc_kv_cache_usage_ratio") == 0


def test_full_queue_is_429_with_retry_after(live, engine):
    engine.paused.set()  # nothing finishes: one request takes the running slot, one the queue
    body = {**LONG, "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as a, httpx.Client(base_url=live.url, timeout=60) as b:
        with a.stream("POST", "/v1/completions", json=body) as first, \
                b.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == 200 and second.status_code == 200
            refused = httpx.post(f"{live.url}/v1/completions", json=LONG, timeout=10)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and error["message"]
            assert metric(scrape(live.url), "llmc_requests_rejected_total") >= 1
    engine.paused.clear()
    poll_until(lambda: metric(scrape(live.url), "llmc_kv_cache_usage_ratio") == 0, what="KV pages freed")
    reply = httpx.post(f"{live.url}/v1/completions", json={"prompt": "c", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200


def test_more_choices_than_the_server_admits_is_400_not_429(live):
    response = httpx.post(f"{live.url}/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 3}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_engine_failure_fails_the_request_not_the_server(live, engine):
    engine.fail_next_step.set()
    response = httpx.post(f"{live.url}/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=60)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert metric(scrape(live.url), "llmc_kv_cache_usage_ratio") == 0
    reply = httpx.post(f"{live.url}/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200

    engine.fail_next_step.set()  # streamed: the status line is out, so the error is an event
    with httpx.stream("POST", f"{live.url}/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True},
                      timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
