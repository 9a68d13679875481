"""A tp=2 package whose worker rank dies mid-request: the server answers 503 within 10 s instead of
hanging, later requests get 503 at once, and /health reports the engine dead.

Both ways a user runs it: the server in this process over ``parallel.load_engine`` (the worker is
a child of this process, so the test kills it directly) and ``python PKG serve --tp 2`` as a
subprocess (the worker is found among the server process's children)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from tests.server.server_helpers import serve_process, serving

DEADLINE_S = 10.0
LONG = {"prompt": [5, 17, 99, 3], "max_tokens": 240, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tp2_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2-failure")
    model = save_tiny_model("llama", root / "model")
    return compile_model(model, "cpu", root / "tp2", overrides=["shard.tp=2"], quality_tokens=0).out_dir


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc, so no extra dependency)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_mid_request(url: str, kill) -> tuple[httpx.Response, float]:
    """Send a long request, kill a worker once the server is generating it; (response, seconds from
    the kill to the response)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "response", httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # running once the first token's step is done
        if 'llmc_num_requests_running 1.0' in httpx.get(f"{url}/metrics", timeout=5).text:
            break
        time.sleep(0.005)  # poll interval
    kill()
    killed = time.monotonic()
    thread.join(DEADLINE_S + 20)
    return result["response"], time.monotonic() - killed


def _assert_dead_server(url: str, response: httpx.Response, seconds: float) -> None:
    print(f"503 {seconds:.2f} s after the worker was killed")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert seconds < DEADLINE_S
    start = time.monotonic()
    after = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=DEADLINE_S)
    assert after.status_code == 503 and time.monotonic() - start < DEADLINE_S
    assert httpx.get(f"{url}/health", timeout=5).status_code == 503


def test_in_process_server_answers_503_when_a_worker_dies(tp2_package):
    from llmc.runtime.parallel import load_engine

    engine = load_engine(tp2_package, tp=2)
    worker = engine.distributed.workers[0]
    try:
        with serving(engine) as server:
            response, seconds = _kill_mid_request(server.url, worker.kill)
            _assert_dead_server(server.url, response, seconds)
    finally:
        engine.distributed.close()


@pytest.mark.slow
def test_serve_cli_tp2_answers_503_when_a_worker_dies(tp2_package):
    import os
    import signal

    with serve_process(tp2_package, "--tp", "2") as (process, url):
        workers = _children(process.pid)
        assert len(workers) == 1, workers  # rank 1; rank 0 is the server process itself
        response, seconds = _kill_mid_request(url, lambda: os.kill(workers[0], signal.SIGKILL))
        _assert_dead_server(url, response, seconds)
