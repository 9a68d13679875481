"""Runs the engine on one background thread and hands its outputs to asyncio (the HTTP server).

The engine is not thread-safe, so only the engine thread ever calls it. The event loop sends it
commands through a queue (add a request, abort one, stop); the thread loops: drain the commands,
``step()`` while there is work, else block on the queue. Outputs come back to the loop with
``loop.call_soon_threadsafe`` and are routed to the ``RequestStream`` of the API request they belong
to. Everything about streams (which are live, how many) is owned by the loop thread; everything
about the engine by the engine thread; the two share only the command queue and ``stats`` (a dict
the engine thread replaces whole after each iteration, read by /metrics and /health).

One API request may be several engine requests (``n`` choices, or a list of prompts): they share
one ``RequestStream`` whose items are ``(choice index, RequestOutput)``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

if TYPE_CHECKING:
    from .engine import RequestOutput
    from .sampler import SamplingParams

log = logging.getLogger("llmc.server")


class QueueFullError(Exception):
    """More requests are waiting than the server admits (the HTTP layer answers 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or the engine failed beyond recovery)."""


class EngineStepError(RuntimeError):
    """``engine.step()`` raised while this request was running; the request was aborted."""


class Observer:
    """Hooks for timing metrics, called on the loop thread; the server's Prometheus metrics implement it."""

    def first_token(self, seconds: float) -> None: ...
    def next_tokens(self, seconds_per_token: float, count: int) -> None: ...
    def finished(self, reason: str, seconds: float) -> None: ...


@dataclass
class _Choice:
    """Loop-side state of one engine request."""

    index: int
    arrival: float
    last_token_at: float | None = None
    finished: bool = False


@dataclass
class RequestStream:
    """The outputs of one API request's engine requests, as ``(index, RequestOutput)`` in arrival order."""

    owner: "AsyncEngine"
    choices: dict[str, _Choice]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def request_ids(self) -> list[str]:
        return list(self.choices)

    def __aiter__(self) -> AsyncIterator[tuple[int, "RequestOutput"]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, "RequestOutput"]]:
        while not all(c.finished for c in self.choices.values()) or not self.queue.empty():
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def final_outputs(self) -> dict[int, list["RequestOutput"]]:
        """Every output of every choice, by choice index (for non-streamed responses)."""
        outputs: dict[int, list] = {c.index: [] for c in self.choices.values()}
        async for index, output in self:
            outputs[index].append(output)
        return outputs

    def close(self) -> None:
        """Abort the choices that have not finished (the client went away, or the response failed)."""
        unfinished = [rid for rid, c in self.choices.items() if not c.finished]
        if unfinished:
            self.owner.abort(unfinished)


class AsyncEngine:
    """The engine behind an asyncio API: ``await submit(...)`` gives a ``RequestStream``.

    ``capacity`` bounds the engine requests in flight (running + waiting): the engine's running slots
    plus the waiting queue the server allows. Beyond it ``submit`` raises ``QueueFullError`` at once
    instead of queueing without limit (a client should retry, not wait on a dead socket).
    """

    def __init__(self, engine: Any, capacity: int, observer: Observer | None = None) -> None:
        self.engine = engine
        self.capacity = capacity
        self.observer = observer or Observer()
        self.stats: dict = {"num_waiting": 0, "num_running": 0}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: str | None = None  # why the engine thread stopped

    # ---- loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llmc-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def submit(self, prompts: Sequence[list[int]], params: Sequence["SamplingParams"],
                     priority: int = 0) -> RequestStream:
        """Add one engine request per (prompt, params) pair; their outputs come on one stream.

        Raises the engine's ``RequestError``/``SamplingError`` (nothing is left running then),
        ``QueueFullError`` or ``EngineDeadError``.
        """
        if not self.alive:
            raise EngineDeadError(self._dead or "the engine is not running")
        if self.num_in_flight + len(prompts) > self.capacity:
            raise QueueFullError(f"{self.num_in_flight} requests are in flight and the server admits "
                                 f"{self.capacity}; retry later")
        base = f"req-{next(self._ids)}"
        now = time.perf_counter()
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, {rid: _Choice(i, now) for i, rid in enumerate(ids)})
        for rid in ids:
            self._streams[rid] = stream
        added = self._loop.create_future()
        self._commands.put(("add", ids, list(prompts), list(params), priority, added))
        try:
            await added
        except BaseException:  # rejected by the engine, or this coroutine was cancelled
            for rid in ids:
                self._streams.pop(rid, None)
            self._commands.put(("abort", ids))  # no-op for ids the engine never took
            raise
        return stream

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop these engine requests and free their KV pages (the engine thread does it next)."""
        self._retire(request_ids, "abort")
        self._commands.put(("abort", list(request_ids)))

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still running and stop the engine thread (server shutdown)."""
        if self._thread is None:
            return
        for stream in {id(s): s for s in self._streams.values()}.values():  # streams are unhashable dataclasses
            stream.queue.put_nowait(EngineDeadError("the server is shutting down"))
        self.abort(list(self._streams))
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def _deliver(self, outputs: list["RequestOutput"]) -> None:
        now = time.perf_counter()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted while this step ran
                continue
            choice = stream.choices[output.request_id]
            if output.new_token_ids:
                if choice.last_token_at is None:
                    self.observer.first_token(now - choice.arrival)
                    if len(output.new_token_ids) > 1:
                        self.observer.next_tokens(0.0, len(output.new_token_ids) - 1)
                else:
                    count = len(output.new_token_ids)
                    self.observer.next_tokens((now - choice.last_token_at) / count, count)
                choice.last_token_at = now
            if output.finished:
                choice.finished = True
                del self._streams[output.request_id]
                self.observer.finished(output.finish_reason or "stop", now - choice.arrival)
            stream.queue.put_nowait((choice.index, output))

    def _retire(self, request_ids: Sequence[str], reason: str, error: BaseException | None = None) -> None:
        """Forget these requests on the loop side (counted under ``reason``); ``error`` goes to their readers."""
        now = time.perf_counter()
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                choice = stream.choices[rid]
                choice.finished = True
                self.observer.finished(reason, now - choice.arrival)
                if error is not None:
                    stream.queue.put_nowait(error)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        self._retire(request_ids, "error", error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)

    def _call_soon(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    # ---- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        live: set[str] = set()  # engine requests added and not yet finished or aborted
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                try:
                    command = self._commands.get(block=not busy)
                except queue.Empty:
                    command = None
                while command is not None:
                    if command[0] == "stop":
                        return
                    self._handle(command, live)
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                if self.engine.has_unfinished_requests():
                    self._step(live)
                self._refresh_stats()
        except BaseException as exc:  # a bug in the engine's bookkeeping: say so, fail everyone
            self._dead = f"the engine thread failed: {exc!r}"
            log.error("%s\n%s", self._dead, traceback.format_exc())
        finally:
            self._dead = self._dead or "the engine has been stopped"
            self._call_soon(self._fail_all, EngineDeadError(self._dead))

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:  # freeing one request's pages must not stop the others
            log.error("engine.abort_request(%r) failed\n%s", request_id, traceback.format_exc())

    def _handle(self, command: tuple, live: set[str]) -> None:
        if command[0] == "abort":
            for rid in command[1]:
                if rid in live:
                    live.discard(rid)
                    self._abort_quietly(rid)
            return
        _, ids, prompts, params, priority, added = command
        done: list[str] = []
        try:
            for rid, prompt, param in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, param, priority=priority)
                done.append(rid)
        except Exception as exc:  # RequestError / SamplingError: a bad request, not a bad engine
            for rid in done:
                self._abort_quietly(rid)
            self._call_soon(_settle, added, exc)
            return
        live.update(done)
        self._call_soon(_settle, added, None)

    def _step(self, live: set[str]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            if not live:  # nothing of ours to blame: the engine itself is broken
                raise
            # One bad step must not take the server down: abort what ran, report it, carry on.
            log.error("engine.step() failed; aborting %d request(s)\n%s", len(live), traceback.format_exc())
            failed = list(live)
            for rid in failed:
                self._abort_quietly(rid)
            live.clear()
            self._call_soon(self._fail, failed, EngineStepError(f"the engine failed on this request: {exc}"))
            return
        for output in outputs:
            if output.finished:
                live.discard(output.request_id)
        self._refresh_stats()  # before the outputs go out: a client that reads /metrics next sees this step
        if outputs:
            self._call_soon(self._deliver, outputs)

    def _refresh_stats(self) -> None:
        stats = dict(self.engine.metrics())
        stats["num_waiting"] = self.engine.num_waiting
        stats["num_running"] = self.engine.num_running
        self.stats = stats  # one assignment: readers see the old dict or the new one


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the submitting coroutine was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
