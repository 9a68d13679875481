"""The package's OpenAI-compatible HTTP server (``python PKG serve``): the FastAPI app, requests to engine
requests, responses and streaming (request models and limits: ``api_models.py``; metrics:
``server_metrics.py``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed as server-sent events
when ``"stream": true``), ``GET /v1/models``, ``GET /health`` (never behind the API key) and
``GET /metrics`` (Prometheus text). Errors always have OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``; a malformed request is a 400, never a 422 or a 500.

API decisions (the README's server section says the same to users):

- Unknown fields are a 400 naming the field: a typo such as ``max_token`` must not be ignored
  silently. OpenAI fields that change nothing here are accepted and ignored (``user``, ``store``,
  ``metadata``, ``service_tier``, ``parallel_tool_calls``); fields llmc cannot honour are accepted
  only at their do-nothing value (``echo: false``, ``logit_bias: {}``, ``tools: []``, ...).
- ``null`` means "not given", as in OpenAI's API; ``temperature`` defaults to OpenAI's 1.0.
- ``n > 1`` runs ``n`` engine requests (seeds ``seed + i`` when a seed is given); a completion
  ``prompt`` may be a list of strings or of token-id lists (choice index = prompt * n + i).
- ``max_tokens`` defaults to 16 for completions (OpenAI's legacy default; shortened to fit the
  context) and to the rest of the context for chat. A prompt plus ``max_tokens`` beyond the
  context is a 400 with code ``context_length_exceeded``, as OpenAI answers.
- An unknown ``model`` is a 400 (code ``model_not_found``); a missing one means the served model.
- Extensions (vLLM's names): ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
  ``stop_token_ids``, ``priority`` (lower runs first, as in vLLM).
- Backpressure: at most ``max_num_seqs + max_queue`` engine requests in flight; beyond, 429 with
  ``Retry-After``. A client that disconnects has its requests aborted and their KV pages freed.
- Limits per request, each a 4xx naming the limit: the body at most ``max_request_bytes`` (1 MiB; 413);
  ``n`` x prompts at most ``MAX_CHOICES`` (64) and the server's capacity; ``logprobs`` /
  ``top_logprobs`` at most ``MAX_LOGPROBS`` (20); at most 16 ``stop`` strings of at most
  ``MAX_STOP_CHARS`` (256) characters; at most 64 ``stop_token_ids``; prompt + ``max_tokens`` within
  the context (the prompt alone must leave room for one token).
- Security defaults: ``serve`` binds 127.0.0.1; with an API key every route but ``/health`` answers 401
  without it (unknown paths too, so the key also hides which routes exist). There is no ``/docs``,
  ``/redoc`` or ``/openapi.json``: the API is OpenAI's and documented there, and a schema route
  would be one more surface to guard.
- SIGTERM: stop accepting, let in-flight requests finish for up to ``drain_timeout`` s, then end the
  rest with an error their clients can read (a 503, or an error event and ``[DONE]``) and exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_models import (MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, GenerationRequest,
                         check_neutral, error_response, is_int, validation_error)
from .async_engine import AsyncEngine, EngineDeadError, EngineStepError, QueueFullError, RequestStream
from .sampler import SamplingError, SamplingParams
from .server_metrics import ServerMetrics
from .tokenizer import TokenizerError

OPEN_PATHS = {"/health"}  # reachable without the API key (load balancers probe it)
RETRY_AFTER_SECONDS = 1
LOGPROB_FLOOR = -9999.0   # -inf is not JSON; OpenAI and vLLM clamp the same way
DRAIN_GRACE_SECONDS = 5   # after the drain deadline, for the error answers to reach their clients


# ---- request -> engine requests --------------------------------------------------------------------

class Served:
    """What the routes need besides the request: the engine bridge, the tokenizer, the limits."""

    def __init__(self, engine: Any, async_engine: AsyncEngine, model_name: str, max_request_bytes: int) -> None:
        self.engine = engine
        self.async_engine = async_engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = int(engine.max_model_len)
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                           "(see /v1/models)", param="model", code="model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError("this model has no tokenizer, so text prompts cannot be encoded; send the prompt "
                           "as a list of token ids to /v1/completions", param=param)
        return self.tokenizer.encode(text)

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def fit_max_tokens(self, requested: int | None, default: int | None, prompt_len: int, prompt_param: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens, but the prompt "
                           f"has {prompt_len} tokens; shorten it", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                           "for the completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    async def submit(self, body: GenerationRequest, prompts: list[list[int]], max_tokens: list[int],
                     logprobs: int | None, prompt_param: str) -> RequestStream:
        """One engine request per prompt and choice; engine-side rejections become 400s."""
        count = len(prompts) * body.n
        limit = min(MAX_CHOICES, self.async_engine.capacity)  # beyond capacity a retry could never succeed
        if count > limit:
            raise ApiError(f"{len(prompts)} prompt(s) x n={body.n} is {count} choices; this server takes at most "
                           f"{limit} in one request", param="n")
        try:
            params = [self.sampling_params(body, max_tokens[p], logprobs, i)
                      for p in range(len(prompts)) for i in range(body.n)]
        except SamplingError as exc:
            raise ApiError(str(exc), param=getattr(exc, "param", None)) from None
        try:
            return await self.async_engine.submit([p for p in prompts for _ in range(body.n)], params,
                                                  priority=body.priority)
        except QueueFullError as exc:
            raise ApiError(f"the server is busy: {exc}", status=429, type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineDeadError as exc:
            raise ApiError(str(exc), status=503, type="server_error", code="engine_unavailable") from None
        except ValueError as exc:  # the engine's RequestError / SamplingError
            param = getattr(exc, "param", None)
            raise ApiError(str(exc), param=prompt_param if param == "prompt" else param) from None

    @staticmethod
    def sampling_params(body: GenerationRequest, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        # Tiny temperature / top_p / repetition_penalty (5e-324) are normalized by SamplingParams itself.
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
            top_p=body.top_p, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=None if body.seed is None else (body.seed + choice) % 2**64,  # OpenAI seeds may be negative
            stop=tuple(body.stop), stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
            logprobs=logprobs)


def completion_prompts(served: Served, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [served.encode(prompt, "prompt")]
    if all(is_int(t) for t in prompt):
        return [list(prompt)]
    return [served.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]


def chat_prompt(served: Served, body: ChatRequest) -> list[int]:
    if served.tokenizer is None:
        raise ApiError("this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
                       param="messages")
    try:
        text = served.tokenizer.apply_chat_template([m.template_dict() for m in body.messages])
    except TokenizerError as exc:
        raise ApiError(str(exc), param="messages") from None
    return served.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials


# ---- responses --------------------------------------------------------------------------------------

def _logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


class CompletionLogprobs:
    """OpenAI's legacy completions logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.offset = 0

    def render(self, entries) -> dict:
        text = self.served.token_text
        tokens = [text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries],
                "top_logprobs": [{text(i): _logprob(lp) for i, lp in e.top} for e in entries],
                "text_offset": offsets}


def chat_logprobs(served: Served, entries) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        token = served.token_text(token_id)
        return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries], "refusal": None}


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class Exchange:
    """One API request's answer, streamed or whole; the two endpoints differ only in the hooks below."""

    object_name: str = ""
    chunk_object: str = ""
    id_prefix: str = ""

    def __init__(self, served: Served, body: GenerationRequest, prompts: list[list[int]],
                 stream: RequestStream) -> None:
        self.served, self.body, self.prompts, self.stream = served, body, prompts, stream
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = len(prompts) * body.n

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model_name,
                "system_fingerprint": None, "choices": choices}

    # ---- whole response
    async def respond(self, request: Request) -> Response:
        try:
            outputs = await _unless_disconnected(request, self.stream.final_outputs())
        except EngineDeadError as exc:
            raise ApiError(str(exc), status=503, type="server_error", code="engine_unavailable") from None
        except EngineStepError as exc:
            raise ApiError(str(exc), status=500, type="server_error", code="engine_error") from None
        finally:
            self.stream.close()  # aborts what has not finished (the client went away) and frees its pages
        if outputs is None:  # nobody is left to read an answer
            return Response(status_code=499)
        choices = [self.final_choice(index, outputs[index]) for index in range(self.choices)]
        generated = sum(len(out[-1].output_token_ids) for out in outputs.values() if out)
        return JSONResponse({**self.envelope(self.object_name, choices), "usage": usage(self.prompts, generated)})

    def final_choice(self, index: int, outputs: list) -> dict:
        raise NotImplementedError

    # ---- streamed response
    def streaming_response(self) -> StreamingResponse:
        return _EventStreamResponse(self.events(), self.stream)

    async def events(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        generated: dict[int, int] = {}
        try:
            for chunk in self.opening_chunks():
                yield sse({**self.envelope(self.chunk_object, chunk), **extra})
            async for index, output in self.stream:
                generated[index] = len(output.output_token_ids)
                for chunk in self.delta_chunks(index, output):
                    yield sse({**self.envelope(self.chunk_object, chunk), **extra})
            if include_usage:
                total = usage(self.prompts, sum(generated.values()))
                yield sse({**self.envelope(self.chunk_object, []), "usage": total})
        except (EngineDeadError, EngineStepError) as exc:
            # The status line has gone already; OpenAI's SDKs raise on an "error" event.
            yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        yield sse("[DONE]")

    def opening_chunks(self) -> list[list[dict]]:
        return []

    def delta_chunks(self, index: int, output) -> list[list[dict]]:
        raise NotImplementedError


class CompletionExchange(Exchange):
    object_name, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.logprobs = {i: CompletionLogprobs(self.served) for i in range(self.choices)}

    def _logprobs(self, index: int, entries) -> dict | None:
        return None if entries is None else self.logprobs[index].render(entries)

    def final_choice(self, index: int, outputs: list) -> dict:
        entries = None if outputs[-1].logprobs is None else [e for out in outputs for e in out.logprobs or ()]
        return {"index": index, "text": outputs[-1].text, "logprobs": self._logprobs(index, entries),
                "finish_reason": outputs[-1].finish_reason}

    def delta_chunks(self, index: int, output) -> list[list[dict]]:
        if not (output.new_text or output.finished or output.logprobs):
            return []
        return [[{"index": index, "text": output.new_text, "logprobs": self._logprobs(index, output.logprobs),
                  "finish_reason": output.finish_reason if output.finished else None}]]


class ChatExchange(Exchange):
    object_name, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _logprobs(self, entries) -> dict | None:
        return None if entries is None or not self.body.logprobs else chat_logprobs(self.served, entries)

    def final_choice(self, index: int, outputs: list) -> dict:
        entries = None if outputs[-1].logprobs is None else [e for out in outputs for e in out.logprobs or ()]
        return {"index": index, "message": {"role": "assistant", "content": outputs[-1].text},
                "logprobs": self._logprobs(entries), "finish_reason": outputs[-1].finish_reason}

    def opening_chunks(self) -> list[list[dict]]:
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
                for i in range(self.choices)]

    def delta_chunks(self, index: int, output) -> list[list[dict]]:
        chunks = []
        if output.new_text or output.logprobs:
            chunks.append([{"index": index, "delta": {"content": output.new_text},
                            "logprobs": self._logprobs(output.logprobs), "finish_reason": None}])
        if output.finished:  # OpenAI sends the finish reason in a chunk of its own with an empty delta
            chunks.append([{"index": index, "delta": {}, "logprobs": None, "finish_reason": output.finish_reason}])
        return chunks


class _EventStreamResponse(StreamingResponse):
    """Server-sent events that abort their engine requests however the response ends.

    Starlette cancels the response when the client disconnects, possibly before the event
    generator has started (then its own ``finally`` would never run), so the abort lives here.
    """

    def __init__(self, events: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request_stream.close()


async def _unless_disconnected(request: Request, work) -> Any:
    """Await ``work``; None (and ``work`` cancelled) if the client disconnects first."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        task.cancel()
        watcher.cancel()


# ---- app -----------------------------------------------------------------------------------------

class ApiKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer KEY`` (compared in constant time)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_request(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The JSON body validated by ``model``; 413 beyond ``limit`` bytes, 400 for anything malformed."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        # A browser page can POST text/plain to localhost without a CORS preflight; JSON it cannot.
        raise ApiError("send the request body as JSON with 'Content-Type: application/json'", status=415)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(f"request body exceeds the limit of {limit} bytes", status=413)
    try:
        # pydantic's parser, not json.loads: it refuses lone surrogates (the tokenizer raises on them) and
        # nesting past 200 levels (json.loads raises RecursionError)
        data = from_json(body)
    except ValueError as exc:  # malformed JSON and undecodable bytes
        raise ApiError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def create_app(engine: Any, *, model_name: str | None = None, api_key: str | None = None, max_queue: int = 128,
               running_slots: int | None = None, max_request_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``LLMEngine``); the engine thread runs while the app lives."""
    slots = running_slots or engine_running_slots(engine)
    metrics = ServerMetrics(lambda: async_engine.stats)
    async_engine = AsyncEngine(engine, capacity=slots + max_queue, observer=metrics)
    served = Served(engine, async_engine, model_name or engine.model_name, max_request_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.stop()

    app = FastAPI(title="llmc", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.served, app.state.metrics = served, metrics
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if exc.status == 429:
            metrics.rejected.inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()  # FastAPI's 422, in OpenAI's shape and status

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_request(request, CompletionRequest, served.max_request_bytes)
        served.check_model(body.model)
        check_neutral(body)
        prompts = completion_prompts(served, body)
        max_tokens = [served.fit_max_tokens(body.max_tokens, 16, len(p), "prompt") for p in prompts]
        stream = await served.submit(body, prompts, max_tokens, body.logprobs, "prompt")
        exchange = CompletionExchange(served, body, prompts, stream)
        return exchange.streaming_response() if body.stream else await exchange.respond(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_request(request, ChatRequest, served.max_request_bytes)
        served.check_model(body.model)
        check_neutral(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = chat_prompt(served, body)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = [served.fit_max_tokens(requested, None, len(prompt), "messages")]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stream = await served.submit(body, [prompt], max_tokens, logprobs, "messages")
        exchange = ChatExchange(served, body, [prompt], stream)
        return exchange.streaming_response() if body.stream else await exchange.respond(request)

    def model_card() -> dict:
        return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "llmc",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        if model != served.model_name:  # OpenAI answers an unknown model here with 404
            return error_response(404, f"the model {model!r} does not exist; this server serves "
                                  f"{served.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.alive:
            return error_response(503, "the engine is not running", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def engine_running_slots(engine: Any) -> int:
    """How many sequences the engine runs at once (its ``max_num_seqs``)."""
    for owner in (engine, getattr(engine, "config", None), getattr(engine, "scheduler", None)):
        value = getattr(owner, "max_num_seqs", None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def serve(engine: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = 128, max_request_bytes: int = 1 << 20,
          drain_timeout: float = 30.0, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests (up to ``drain_timeout`` s); 0 on a clean exit."""
    import uvicorn

    app = create_app(engine, model_name=model_name, api_key=api_key, max_queue=max_queue,
                     max_request_bytes=max_request_bytes)
    served = app.state.served
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout + DRAIN_GRACE_SECONDS)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # At the drain deadline, end what still runs with an error its client can read (a 503, or an
            # error event and [DONE]); uvicorn's own deadline, a grace later, would just cut connections.
            async def end_in_flight() -> None:
                await asyncio.sleep(drain_timeout)
                await served.async_engine.stop()

            deadline = asyncio.ensure_future(end_in_flight())
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    server = DrainingServer(config)
    url_host = f"[{host}]" if ":" in host else host
    print(engine.kv_report(), flush=True)
    print(f"serving {served.model_name!r} at http://{url_host}:{port}/v1 (OpenAI API; /health, /metrics)"
          + ("; API key required" if api_key else ""), flush=True)
    # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, drain, shut the lifespan down), then
    # re-raises the signal under the handlers it found. Installing no-op ones here makes that re-raise
    # harmless, so a drained shutdown exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
