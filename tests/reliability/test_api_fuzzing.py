"""API fuzzing: schemathesis cases from the server's OpenAPI schema, then hand-written malformed requests.

Every answer must be a 2xx, or a 4xx whose body is OpenAI's error JSON (``{"error": {"message", "type",
"param", "code"}}``) of at most 4 KiB; never a 5xx or a dropped connection, and /health stays 200.

The app serves no /openapi.json, and its routes read the body by hand, so the document FastAPI builds for
it (``app.openapi()``) lists every route but no request body. The bodies come from the server's own
request models, tightened where the server checks in code (prompt shapes, the do-nothing values of
unsupported fields) so that positive cases mostly pass, and capped where generation would be slow
(``max_tokens``, ``n``). Negative cases break one constraint of that schema at a time.

Run with ``-s`` to see the figures (cases per operation and mode, answers per status).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any, NamedTuple

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from llmc.runtime.api_models import ChatRequest, CompletionRequest
from llmc.runtime.server import create_app
from server_helpers import InProcessServer, load_engine

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MAX_ERROR_BYTES = 4096
MAX_MODEL_LEN = 64  # a chat without max_tokens generates to the end of the context: keep that short
VOCAB = 128         # the tiny Llama's; its char tokenizer maps c to ord(c)
OK_COMPLETION = {"prompt": "abc", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (operation, mode, examples): every operation of the schema, >= 1,000 cases in all.
RUNS = [
    (f"POST {COMPLETIONS}", POSITIVE, 250),
    (f"POST {COMPLETIONS}", NEGATIVE, 250),
    (f"POST {CHAT}", POSITIVE, 250),
    (f"POST {CHAT}", NEGATIVE, 250),
    ("GET /v1/models/{model}", POSITIVE, 40),
    ("GET /v1/models", POSITIVE, 1),   # no parameters: one case is all there is
    ("GET /health", POSITIVE, 1),
    ("GET /metrics", POSITIVE, 1),
]
MIN_CASES = 1000

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": VOCAB - 1},
              "minItems": 1, "maxItems": 8}
_SHORT_TEXT = {"type": "string", "minLength": 1, "maxLength": 24}
_MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": 4}
# Field -> its schema for fuzzing, where the request model's says less than the server checks or allows
# more work than a fast test can do.
FIELD_SCHEMAS: dict[str, dict] = {
    "prompt": {"anyOf": [_SHORT_TEXT, _TOKEN_IDS,
                         {"type": "array", "items": _SHORT_TEXT, "minItems": 1, "maxItems": 3},
                         {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 3}]},
    "max_tokens": _MAX_TOKENS,
    "max_completion_tokens": _MAX_TOKENS,
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 64},
    "echo": {"const": False},
    "suffix": {"const": ""},
    "best_of": {"const": 1},
    "logit_bias": {"type": "object", "maxProperties": 0},
    "tools": {"type": "array", "maxItems": 0},
    "tool_choice": {"enum": ["none", "auto"]},
    "response_format": {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
                        "additionalProperties": False},
}
REQUIRED = {COMPLETIONS: ["prompt", "max_tokens"], CHAT: ["messages", "max_tokens"]}


def fuzz_document(app, model_name: str) -> dict:
    """The app's OpenAPI document with request bodies from its request models (see the module docstring)."""
    document = copy.deepcopy(app.openapi())
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for path, model in ((COMPLETIONS, CompletionRequest), (CHAT, ChatRequest)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        properties = body["properties"]
        properties.update({name: s for name, s in FIELD_SCHEMAS.items() if name in properties})
        properties["model"] = {"enum": [model_name]}
        body["required"] = REQUIRED[path]
        document["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": body}}}
    return document


@pytest.fixture(scope="module")
def fuzz_server(reliability_package):
    server = InProcessServer(create_app(load_engine(reliability_package, max_model_len=MAX_MODEL_LEN)))
    with server:  # (TCP_NODELAY set by InProcessServer: keep-alive answers are not held back by Nagle)
        yield server


def whole_floats_to_ints(value: Any) -> Any:
    """``1.0`` as ``1`` throughout: JSON Schema counts 1.0 as an integer, the server's strict models do not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [whole_floats_to_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: whole_floats_to_ints(v) for k, v in value.items()}
    return value


def error_problem(status: int, content_type: str, content: bytes) -> str | None:
    """What is wrong with a 4xx answer, or None when it is OpenAI's error JSON of bounded size."""
    if len(content) > MAX_ERROR_BYTES:
        return f"{status} body of {len(content)} bytes (limit {MAX_ERROR_BYTES})"
    if not content_type.startswith("application/json"):
        return f"{status} with content type {content_type!r}"
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} body is not {{'error': ...}}: {content[:200]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"{status} error has keys {sorted(error) if isinstance(error, dict) else error!r}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"{status} error message/type: {error!r}"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"{status} error param/code: {error!r}"
    return None


def answer_problem(status: int, content_type: str, content: bytes, cut_short: bool = False) -> str | None:
    """What is wrong with any answer: a 5xx, a malformed error, a 2xx generation that is not whole."""
    if status >= 500:
        return f"{status}: {content[:300]!r}"
    if 400 <= status < 500:
        return error_problem(status, content_type, content)
    if content_type.startswith("text/event-stream"):
        if not cut_short and not content.endswith(b"data: [DONE]\n\n"):
            return f"event stream without [DONE]: {content[-200:]!r}"
    elif content_type.startswith("application/json"):
        json.loads(content)  # a 200 that is not JSON fails the test with the parser's message
    return None


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


# ---- schemathesis ---------------------------------------------------------------------------------

def test_schemathesis_cases_never_get_a_5xx(fuzz_server):
    app = fuzz_server.app
    schema = schemathesis.openapi.from_dict(fuzz_document(app, app.state.served.model_name))
    operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    assert set(operations) == {label for label, _, _ in RUNS}, "every route is fuzzed"

    session = requests.Session()
    statuses: Counter = Counter()
    cases: Counter = Counter()
    failures: list[str] = []

    for label, mode, examples in RUNS:
        @given(case=operations[label].as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            cases[label, mode.value] += 1
            if mode is POSITIVE and isinstance(case.body, dict):
                case.body = whole_floats_to_ints(case.body)
            try:
                response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
            except requests.RequestException as exc:
                statuses["dropped"] += 1
                failures.append(f"{label} {mode.value}: {type(exc).__name__}: {exc}\n{case.as_curl_command()}")
                return
            statuses[response.status_code] += 1
            content_type = response.headers.get("content-type", [""])[0]
            problem = answer_problem(response.status_code, content_type, response.content,
                                     response.stream_cut_short)
            if problem:
                failures.append(f"{label} {mode.value}: {problem}\n{case.as_curl_command()}")

        run()
        assert_healthy(fuzz_server.url)

    total = sum(cases.values())
    print(f"\nschemathesis: {total} cases, {len(failures)} failures")
    for (label, mode), count in sorted(cases.items()):
        print(f"  {label} {mode}: {count}")
    print("  answers: " + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items(), key=str)))
    assert not failures, f"{len(failures)} failing cases; the first:\n" + "\n\n".join(failures[:5])
    assert total >= MIN_CASES
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if s != 200) > 0  # both paths ran


# ---- hand-written malformed requests ----------------------------------------------------------------

class Bad(NamedTuple):
    id: str
    body: Any                   # bytes go as they are, anything else as JSON (ASCII, so lone surrogates pass)
    path: str = COMPLETIONS
    status: int = 400
    param: str | None = None    # the field the error must name, when it is known
    method: str = "POST"
    content_type: str | None = "application/json"
    chunked: bool = False       # sent without Content-Length, in 64 KiB chunks


def surrogate(template: str) -> bytes:
    """``template`` with ``@`` replaced by a JSON-escaped lone surrogate (json.dumps cannot write one)."""
    return template.replace("@", "\\ud800").encode()


MB = 1 << 20
DEEP = 100_000  # nesting levels: beyond any recursive JSON parser's stack

# Field -> a value of the wrong JSON type, per endpoint.
WRONG_TYPES = {
    "model": 5, "n": "2", "stream": "yes", "stream_options": [], "stop": 5, "seed": "1", "temperature": "hot",
    "top_p": [], "presence_penalty": {}, "frequency_penalty": True, "top_k": 1.5, "min_p": "0",
    "repetition_penalty": [1], "ignore_eos": 1, "stop_token_ids": "1", "priority": 1.5, "user": 5,
    "store": "y", "metadata": [], "service_tier": 5, "logit_bias": [],
}
COMPLETION_WRONG_TYPES = {"prompt": {}, "max_tokens": 1.5, "logprobs": True, "echo": "no", "suffix": 5,
                          "best_of": "1"}
CHAT_WRONG_TYPES = {"messages": {}, "max_tokens": "2", "max_completion_tokens": 2.5, "logprobs": 1,
                    "top_logprobs": "2", "parallel_tool_calls": "no", "tools": {}, "tool_choice": 5,
                    "response_format": "text"}

MALFORMED = [
    # not a JSON object
    Bad("list", [1, 2]),
    Bad("empty-list", []),
    Bad("string", "text"),
    Bad("number", 5),
    Bad("null", None),
    Bad("bool", True),
    Bad("nan-body", b"NaN"),
    Bad("chat-list", [OK_CHAT], path=CHAT),
    # not JSON
    Bad("empty-body", b""),
    Bad("truncated", b'{"prompt": "a"'),
    Bad("single-quotes", b"{'prompt': 'a'}"),
    Bad("trailing-garbage", b'{"prompt": "a", "max_tokens": 2} x'),
    Bad("bare-word", b"{prompt: a}"),
    Bad("deep-nesting", b"[" * DEEP + b"]" * DEEP),                                   # a RecursionError: 500
    Bad("deep-nesting-in-field", b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    Bad("huge-integer", b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}"),
    # bytes that are not UTF-8, and lone surrogates
    Bad("invalid-utf8", b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
    Bad("overlong-utf8", b'{"prompt": "\xc0\xaf", "max_tokens": 2}'),
    Bad("utf8-encoded-surrogate", b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}'),       # was a 500
    Bad("surrogate-prompt", surrogate('{"prompt": "a@b", "max_tokens": 2}')),             # was a 500
    Bad("surrogate-prompt-list", surrogate('{"prompt": ["ok", "@"], "max_tokens": 2}')),  # was a 500
    Bad("surrogate-stop", surrogate('{"prompt": "a", "stop": ["@"], "max_tokens": 2}')),
    Bad("surrogate-model", surrogate('{"prompt": "a", "model": "@"}')),
    Bad("surrogate-field-name", surrogate('{"prompt": "a", "x@": 1}')),
    Bad("surrogate-chat-content", surrogate('{"messages": [{"role": "user", "content": "@"}]}'), path=CHAT),
    Bad("surrogate-chat-name", surrogate('{"messages": [{"role": "user", "content": "a", "name": "@"}]}'),
        path=CHAT),
    # sizes
    Bad("huge-n", {**OK_COMPLETION, "n": 10**6}, param="n"),
    Bad("n-65", {**OK_COMPLETION, "n": 65}, param="n"),
    Bad("choices-over-64", {"prompt": ["a", "b"], "n": 64, "max_tokens": 1}, param="n"),
    Bad("prompts-over-64", {"prompt": ["a"] * 65, "max_tokens": 1}, param="n"),
    Bad("huge-max-tokens", {**OK_COMPLETION, "max_tokens": 10**9}, param="max_tokens"),
    Bad("max-tokens-2-64", {**OK_COMPLETION, "max_tokens": 2**64}, param="max_tokens"),
    Bad("huge-logprobs", {**OK_COMPLETION, "logprobs": 10**6}, param="logprobs"),
    Bad("logprobs-2-100", {**OK_COMPLETION, "logprobs": 2**100}, param="logprobs"),
    Bad("huge-top-logprobs", {**OK_CHAT, "logprobs": True, "top_logprobs": 10**6}, path=CHAT, param="top_logprobs"),
    Bad("top-logprobs-21", {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, path=CHAT, param="top_logprobs"),
    Bad("chat-huge-max-tokens", {**OK_CHAT, "max_completion_tokens": 10**9}, path=CHAT, param="max_tokens"),
    Bad("empty-prompt", {**OK_COMPLETION, "prompt": ""}, param="prompt"),
    Bad("1e6-char-prompt", {"prompt": "a" * 1_000_000}, param="prompt"),                 # longer than the context
    Bad("1mb-prompt", {"prompt": "a" * MB}, status=413),                                 # over the body limit
    Bad("8mb-body", {"prompt": "a", "padding": "x" * (8 * MB)}, status=413),
    Bad("8mb-chunked-body", {"prompt": "a", "padding": "x" * (8 * MB)}, status=413, chunked=True),
    Bad("multi-mb-stop-list", {**OK_COMPLETION, "stop": ["x" * 1000] * 3000}, status=413),
    Bad("stop-list-of-17", {**OK_COMPLETION, "stop": ["x"] * 17}, param="stop"),
    Bad("long-unknown-model", {**OK_COMPLETION, "model": "m" * 500_000}, param="model"),  # echoed: unbounded
    Bad("long-unknown-field", {**OK_COMPLETION, "f" * 500_000: 1}),                      # echoed: unbounded
    Bad("long-model-path", None, path="/v1/models/" + "m" * 8000, status=404, method="GET"),
    # numbers out of range
    Bad("negative-temperature", {**OK_COMPLETION, "temperature": -1}, param="temperature"),
    Bad("temperature-3", {**OK_COMPLETION, "temperature": 3}, param="temperature"),
    Bad("nan-temperature", b'{"prompt": "a", "max_tokens": 2, "temperature": NaN}', param="temperature"),
    Bad("infinite-temperature", b'{"prompt": "a", "max_tokens": 2, "temperature": Infinity}', param="temperature"),
    Bad("minus-infinite-temperature", b'{"prompt": "a", "max_tokens": 2, "temperature": -Infinity}',
        param="temperature"),
    Bad("1e999-temperature", b'{"prompt": "a", "max_tokens": 2, "temperature": 1e999}', param="temperature"),
    Bad("top-p-0", {**OK_COMPLETION, "top_p": 0}, param="top_p"),
    Bad("top-p-negative", {**OK_COMPLETION, "top_p": -0.5}, param="top_p"),
    Bad("top-p-over-1", {**OK_COMPLETION, "top_p": 1.0001}, param="top_p"),
    Bad("nan-top-p", b'{"prompt": "a", "max_tokens": 2, "top_p": NaN}', param="top_p"),
    Bad("chat-nan-top-p", b'{"messages": [{"role": "user", "content": "a"}], "top_p": NaN}', path=CHAT,
        param="top_p"),
    Bad("top-k-minus-2", {**OK_COMPLETION, "top_k": -2}, param="top_k"),
    Bad("seed-2-64", {**OK_COMPLETION, "seed": 2**64}, param="seed"),
    Bad("negative-stop-token", {**OK_COMPLETION, "stop_token_ids": [-1]}),
    Bad("token-outside-vocab", {**OK_COMPLETION, "prompt": [VOCAB]}, param="prompt"),
    Bad("negative-token", {**OK_COMPLETION, "prompt": [-1]}, param="prompt"),
    Bad("token-2-70", {**OK_COMPLETION, "prompt": [[2**70]]}, param="prompt"),
    # models, fields, and the do-nothing values of unsupported fields
    Bad("unknown-model", {**OK_COMPLETION, "model": "gpt-4"}, param="model"),
    Bad("chat-unknown-model", {**OK_CHAT, "model": "gpt-4"}, path=CHAT, param="model"),
    Bad("unknown-field", {**OK_COMPLETION, "max_token": 5}, param="max_token"),
    Bad("chat-unknown-field", {**OK_CHAT, "bogus": 1}, path=CHAT, param="bogus"),
    Bad("duplicate-key", b'{"prompt": "a", "max_tokens": 2, "prompt": 5}', param="prompt"),
    Bad("echo-true", {**OK_COMPLETION, "echo": True}, param="echo"),
    Bad("tool-choice-required", {**OK_CHAT, "tool_choice": "required"}, path=CHAT, param="tool_choice"),
    Bad("json-response-format", {**OK_CHAT, "response_format": {"type": "json_object"}}, path=CHAT,
        param="response_format"),
    Bad("top-logprobs-without-logprobs", {**OK_CHAT, "top_logprobs": 2}, path=CHAT, param="top_logprobs"),
    # messages
    Bad("no-messages", {"max_tokens": 2}, path=CHAT, param="messages"),
    Bad("empty-messages", {"messages": []}, path=CHAT, param="messages"),
    Bad("messages-string", {"messages": "hi"}, path=CHAT, param="messages"),
    Bad("message-not-object", {"messages": ["hi"]}, path=CHAT, param="messages.0"),
    Bad("bad-role", {"messages": [{"role": "wizard", "content": "hi"}]}, path=CHAT, param="messages.0.role"),
    Bad("role-missing", {"messages": [{"content": "hi"}]}, path=CHAT, param="messages.0.role"),
    Bad("role-number", {"messages": [{"role": 1, "content": "hi"}]}, path=CHAT, param="messages.0.role"),
    Bad("content-number", {"messages": [{"role": "user", "content": 5}]}, path=CHAT, param="messages.0.content"),
    Bad("content-object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, path=CHAT,
        param="messages.0.content"),
    Bad("content-image-part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        path=CHAT, param="messages.0.content"),
    Bad("content-part-without-text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        path=CHAT, param="messages.0.content"),
    Bad("message-unknown-key", {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, path=CHAT,
        param="messages.0.mood"),
    Bad("chat-body-on-completions", OK_CHAT, param="prompt"),
    # content types, routes, methods
    Bad("text-plain", b'{"prompt": "a"}', status=415, content_type="text/plain"),
    Bad("no-content-type", b'{"prompt": "a"}', status=415, content_type=None),
    Bad("form-encoded", b"prompt=a", status=415, content_type="application/x-www-form-urlencoded"),
    Bad("multipart", b"--x\r\n\r\na\r\n--x--\r\n", status=415, content_type="multipart/form-data; boundary=x"),
    Bad("unknown-route", {}, path="/v1/nothing", status=404),
    Bad("get-completions", None, status=405, method="GET"),
    Bad("delete-chat", None, path=CHAT, status=405, method="DELETE"),
    Bad("post-health", {}, path="/health", status=405),
    Bad("unknown-model-card", None, path="/v1/models/gpt-4", status=404, method="GET", param="model"),
]
MALFORMED += [Bad(f"wrong-type-{field}", {**OK_COMPLETION, field: value}, param=field)
              for field, value in {**WRONG_TYPES, **COMPLETION_WRONG_TYPES}.items()]
MALFORMED += [Bad(f"chat-wrong-type-{field}", {**OK_CHAT, field: value}, path=CHAT, param=field)
              for field, value in {**WRONG_TYPES, **CHAT_WRONG_TYPES}.items()]

MALFORMED_STATUSES: Counter = Counter()


@pytest.fixture(scope="module")
def http(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as client:
        yield client


def send(http: httpx.Client, bad: Bad) -> httpx.Response:
    headers = {"content-type": bad.content_type} if bad.content_type else {}
    content = None
    if bad.body is not None or bad.method == "POST":
        content = bad.body if isinstance(bad.body, bytes) else json.dumps(bad.body).encode()
    if bad.chunked:
        content = iter([content[i:i + (64 << 10)] for i in range(0, len(content), 64 << 10)])
    return http.request(bad.method, bad.path, content=content, headers=headers)


def test_the_malformed_list_covers_enough():
    assert len(MALFORMED) >= 60 and len({bad.id for bad in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("bad", MALFORMED, ids=[bad.id for bad in MALFORMED])
def test_malformed_request_gets_an_openai_error(http, bad):
    response = send(http, bad)  # a dropped connection raises here
    MALFORMED_STATUSES[response.status_code] += 1
    problem = error_problem(response.status_code, response.headers.get("content-type", ""), response.content)
    assert response.status_code == bad.status, response.text[:500]
    assert problem is None, problem
    param = response.json()["error"]["param"]
    if bad.param is not None:  # a union names its branch too: "tool_choice.str"
        assert param is not None and (param == bad.param or param.startswith(bad.param + ".")), param


def test_normal_requests_succeed_after_the_malformed_ones(http, fuzz_server):
    completion = http.post(COMPLETIONS, json=OK_COMPLETION)
    assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"] == "length"
    chat = http.post(CHAT, json={**OK_CHAT, "stream": True})
    assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
    assert_healthy(fuzz_server.url)
    total = sum(MALFORMED_STATUSES.values())
    print(f"\nmalformed requests: {total} of {len(MALFORMED)} sent, answers: "
          + ", ".join(f"{status}: {n}" for status, n in sorted(MALFORMED_STATUSES.items())) + ", 5xx: 0")


def test_sampling_values_below_float32_range_are_not_a_5xx(http):
    """temperature/top_p/repetition_penalty that round to 0 in float32 made the sampler's draw fail (500)."""
    for field in ("temperature", "top_p", "repetition_penalty"):
        for value in (5e-324, 1e-45, 1e-40):
            body = {"prompt": "abc", "max_tokens": 3, "temperature": 1, field: value}
            response = http.post(COMPLETIONS, json=body)
            assert response.status_code == 200, (field, value, response.text[:300])
