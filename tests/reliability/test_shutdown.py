"""Shutdown: SIGTERM to ``python PKG serve`` drains in-flight requests, refuses new ones, exits 0.

Two processes: one whose in-flight requests (streamed and whole, completions and chat) all finish
within ``--drain-timeout``, and one whose requests would outlast a 0.5 s ``--drain-timeout``: they
end at the timeout with an error their clients can read, and the process still exits 0. Neither
leaves a child process behind.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server_helpers import metric, poll_until, serve_process

MAX_TOKENS = 200  # with the chat template, as much as the 256-token context leaves

pytestmark = pytest.mark.slow  # two server processes (torch import, engine load): ~10 s each on 2 busy cores


def descendants(pid: int) -> set[int]:
    """Process ids of ``pid``'s children, their children, ... (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        except (OSError, IndexError):  # the process exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def refused(url: str, path: str = "/health") -> bool:
    """Whether a new connection is refused. /health answers at once, so probing it cannot itself sit in
    the engine's queue while the drain runs (a completion accepted just before the listener closed would)."""
    try:
        if path == "/health":
            httpx.get(f"{url}{path}", timeout=2)
        else:
            httpx.post(f"{url}{path}", json={"prompt": "new", "max_tokens": 2}, timeout=2)
    except httpx.ConnectError:
        return True
    return False


@dataclass
class Call:
    """One request run on a thread: what came back and when."""

    route: str
    body: dict
    status: int | None = None
    events: list[str] = field(default_factory=list)  # streamed: the data of each event
    event_times: list[float] = field(default_factory=list)
    reply: dict | None = None  # whole: the JSON body, answer or error
    finished_at: float | None = None
    error: BaseException | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))

    def run(self, url: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                if self.streamed:
                    with client.stream("POST", self.route, json=self.body) as response:
                        self.status = response.status_code
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                self.events.append(line[len("data: "):])
                                self.event_times.append(time.monotonic())
                else:
                    response = client.post(self.route, json=self.body)
                    self.status, self.reply = response.status_code, response.json()
            self.finished_at = time.monotonic()
        except BaseException as exc:  # reported by the test; the thread must not die silently
            self.error = exc

    @property
    def complete(self) -> bool:
        """Whether the whole answer came: every chunk then [DONE], or the JSON completion."""
        if self.streamed:
            return self.events[-1:] == ["[DONE]"] and not any('"error"' in e for e in self.events)
        return self.status == 200

    @property
    def ended_with_shutdown_error(self) -> bool:
        """Whether the server ended it with an error the client can read: an error event then [DONE],
        or a 503 in OpenAI's shape."""
        if self.streamed:
            return (self.status == 200 and self.events[-1:] == ["[DONE]"]
                    and json.loads(self.events[-2])["error"]["type"] == "server_error")
        return self.status == 503 and self.reply["error"]["type"] == "server_error"

    def completion_tokens(self) -> int:
        if self.reply is not None:
            return self.reply["usage"]["completion_tokens"]
        return json.loads(self.events[-2])["usage"]["completion_tokens"]


def calls(max_tokens: int) -> list[Call]:
    common = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    chat = {"messages": [{"role": "user", "content": "drain me"}]}
    return [Call("/v1/completions", {"prompt": "stream 1", **common, **stream}),
            Call("/v1/chat/completions", {**chat, **common, **stream}),
            Call("/v1/completions", {"prompt": "whole 1", **common}),
            Call("/v1/chat/completions", {**chat, **common})]


def start_in_flight(url: str, running: list[Call], streams_started: bool) -> list[threading.Thread]:
    """Start the calls; return once the engine holds all of them (and, if ``streams_started``, every
    stream has sent an event: it is running, not waiting)."""
    threads = [threading.Thread(target=call.run, args=(url,), daemon=True) for call in running]
    for thread in threads:
        thread.start()

    def all_admitted() -> bool:
        failed = [c.error for c in running if c.error is not None]
        assert not failed, failed
        text = httpx.get(f"{url}/metrics", timeout=5).text
        held = metric(text, "llmc_num_requests_running") + metric(text, "llmc_num_requests_waiting")
        return held == len(running) and (not streams_started or all(c.events for c in running if c.streamed))

    poll_until(all_admitted, deadline_s=60, what="every request in flight")
    return threads


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(reliability_package):
    running = calls(MAX_TOKENS)
    with serve_process(reliability_package, "--max-num-seqs", "4", "--kv-cache-bytes", "4MiB",
                       "--drain-timeout", "60") as (process, url):
        children = descendants(process.pid)
        threads = start_in_flight(url, running, streams_started=True)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        poll_until(lambda: refused(url), deadline_s=10, what="new connections refused")
        refused_after = time.monotonic() - signalled
        draining = [c for c in running if c.finished_at is None]
        assert refused(url, "/v1/completions") and refused(url, "/v1/chat/completions")
        assert draining, "every request had finished before new ones were refused: no drain was observed"
        for thread in threads:
            thread.join(60)
        exit_code = process.wait(60)
        exited_after = time.monotonic() - signalled
    assert exit_code == 0
    for call in running:
        assert call.error is None, f"{call.route}: {call.error!r}"
        assert call.complete and call.completion_tokens() == MAX_TOKENS
        assert call.finished_at > signalled  # it was in flight at SIGTERM and still got all of it
    streamed_after = [sum(t > signalled for t in c.event_times) for c in running if c.streamed]
    assert all(n > 0 for n in streamed_after)
    left = alive(children) | descendants(process.pid)
    assert not left, f"child processes outlived the server: {sorted(left)}"
    drain_s = max(c.finished_at for c in running) - signalled
    print(f"\n[shutdown] SIGTERM with {len(running)} requests in flight (2 streamed, 2 whole): "
          f"new connections refused after {refused_after * 1000:.0f} ms while {len(draining)} were still running; "
          f"all {len(running)} completed ({streamed_after} events streamed after SIGTERM), drained in "
          f"{drain_s:.2f} s; exit code {exit_code} after {exited_after:.2f} s; "
          f"child processes {len(children)} before, {len(left)} after")


def test_drain_timeout_bounds_the_wait(reliability_package):
    drain_timeout = 0.5
    # One running slot and 8 x 200 tokens to decode: far more than the drain timeout on any CPU.
    running = calls(MAX_TOKENS) + calls(MAX_TOKENS)
    with serve_process(reliability_package, "--max-num-seqs", "1", "--kv-cache-bytes", "4MiB",
                       "--drain-timeout", str(drain_timeout)) as (process, url):
        children = descendants(process.pid)
        threads = start_in_flight(url, running, streams_started=False)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(drain_timeout + 30)
        exited_after = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    assert exit_code == 0
    # The deadline ends the requests, then the process exits (interpreter teardown: ~2 s on a busy machine).
    assert drain_timeout <= exited_after < drain_timeout + 15
    for call in running:
        assert call.error is None, f"{call.route}: {call.error!r}"
        assert call.complete or call.ended_with_shutdown_error, (call.status, call.events[-2:], call.reply)
    cut = [c for c in running if not c.complete]
    assert cut, "every request finished within the drain timeout: nothing was cut off"
    left = alive(children) | descendants(process.pid)
    assert not left, f"child processes outlived the server: {sorted(left)}"
    print(f"\n[shutdown] --drain-timeout {drain_timeout:g}: {len(running) - len(cut)}/{len(running)} requests "
          f"finished, {len(cut)} ended at the deadline with a readable error (error event + [DONE], or 503); "
          f"exit code {exit_code} {exited_after:.2f} s after SIGTERM; child processes "
          f"{len(children)} before, {len(left)} after")
