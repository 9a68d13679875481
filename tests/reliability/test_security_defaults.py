"""Security defaults of ``python PKG serve``: localhost, the API key on every route, request limits.

- The server binds 127.0.0.1 unless ``--host`` says otherwise; an empty ``--api-key`` is an error,
  not a server without a key.
- With an API key, every route the app has (walked from ``app.routes`` and ``app.openapi()``, so a
  route added later is covered too) but ``/health`` answers 401 without it and works with it.
  ``/docs``, ``/redoc`` and ``/openapi.json`` are not served (404 with the key, 401 without).
- The body size limit (413) and the per-request limits on ``n``, logprobs, stop strings and prompt
  length each give a 4xx naming the field and the limit; values at the limits are accepted.
"""

from __future__ import annotations

import inspect
import re
import signal

import httpx
import pytest

from server_helpers import load_engine, serving

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 256  # the tiny Llama's positions
BODY_LIMIT = 1 << 20  # create_app's default max_request_bytes


@pytest.fixture(scope="module")
def server(reliability_package):
    with serving(load_engine(reliability_package, kv_cache_bytes=4 << 20), api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        yield client


# ---- binding ---------------------------------------------------------------------------------------

def bound_host(package, monkeypatch, *args: str) -> str:
    """The host ``python PKG serve ARGS`` hands uvicorn (uvicorn is stopped before it binds)."""
    import uvicorn

    from llmc.runtime.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: seen.setdefault("host", self.config.host))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # serve() installs handlers; keep pytest's own
    main(["serve", "--kv-cache-bytes", "1MiB", *args], package_dir=package)
    return seen["host"]


def test_binds_localhost_unless_told_otherwise(reliability_package, monkeypatch):
    from llmc.runtime import cli, server

    assert bound_host(reliability_package, monkeypatch) == "127.0.0.1"
    assert bound_host(reliability_package, monkeypatch, "--host", "0.0.0.0") == "0.0.0.0"
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"
    serve_parser = cli.build_parser("python PKG")._subparsers._group_actions[0].choices["serve"]
    assert serve_parser.get_default("host") == "127.0.0.1"
    print("\n[security] default bind 127.0.0.1 (CLI, serve(), the uvicorn config); --host 0.0.0.0 honoured")


def test_empty_api_key_is_an_error(reliability_package, monkeypatch, capsys):
    import uvicorn

    from llmc.runtime.cli import main

    def run(self, *args, **kwargs):
        raise AssertionError("serve started a server without a key")

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    assert main(["serve", "--api-key", ""], package_dir=reliability_package) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--api-key is empty" in err


# ---- the API key -----------------------------------------------------------------------------------

def route_methods(app) -> set[tuple[str, str]]:
    """(path template, method) of every route the app serves, with path parameters as ``{name}``."""
    found = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            found.add((re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method))
    return found


def valid_call(path: str, method: str, model: str) -> dict:
    """A request that works on this route (the test names every route: a new one must be added here)."""
    calls = {
        ("/v1/completions", "POST"): {"json": {"prompt": "a", "max_tokens": 2}},
        ("/v1/chat/completions", "POST"): {"json": {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}},
        ("/v1/models", "GET"): {},
        ("/v1/models/{model}", "GET"): {},
        ("/metrics", "GET"): {},
        ("/health", "GET"): {},
    }
    assert (path, method) in calls, f"a new route {method} {path}: say here how to call it"
    return {"method": method, "url": path.replace("{model}", model), **calls[(path, method)]}


WRONG_CREDENTIALS = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"},
                     {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": "Bearer"}, {"X-Api-Key": KEY}]


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.status_code)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


def test_every_route_but_health_needs_the_key(server):
    app = server.app
    routes = route_methods(app)
    schema = {(path, method.upper()) for path, item in app.openapi()["paths"].items() for method in item}
    assert routes == schema  # the two walks agree: no route hides from the schema
    model = app.state.served.model_name
    walked = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path, method in sorted(routes):
            call = valid_call(path, method, model)
            if path == "/health":
                assert client.request(**call).status_code == 200
                continue
            for headers in WRONG_CREDENTIALS:
                assert_unauthorized(client.request(**call, headers=headers))
            reply = client.request(**call, headers=AUTH)
            assert reply.status_code == 200, (path, reply.text)
            walked += 1
        # Not served at all: docs and schema routes (and any unknown path) are 401 without the key, 404 with.
        hidden = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/v1/unknown"]
        for path in hidden:
            assert_unauthorized(client.get(path))
            assert client.get(path, headers=AUTH).status_code == 404
        assert_unauthorized(client.get("/health/"))  # only /health itself is open
        for method in ("HEAD", "OPTIONS", "PUT", "DELETE"):  # other methods are refused before routing
            assert client.request(method, "/v1/models").status_code == 401
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url is None
    print(f"\n[security] API key: {walked} routes x {len(WRONG_CREDENTIALS)} wrong credentials -> 401, "
          f"with the key -> 200; /health open; {len(hidden)} docs/unknown paths 401 without the key, 404 with")


# ---- limits ----------------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(http):
    declared = http.post("/v1/completions", json={"prompt": "a", "user": "x" * BODY_LIMIT})
    assert declared.status_code == 413 and str(BODY_LIMIT) in declared.json()["error"]["message"]

    def chunked():  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "a", "user": "'
        for _ in range(BODY_LIMIT // 65536):
            yield b"x" * 65536
        yield b'"}'

    streamed = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and str(BODY_LIMIT) in streamed.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"prompt": "a", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}

# (route, body, param the error names, text the message must hold: the limit, code or None)
OVER_LIMITS = [
    (COMPLETIONS, {**OK, "n": 65}, "n", "64", None),
    (COMPLETIONS, {**OK, "prompt": ["a", "b"], "n": 40}, "n", "64", None),  # n x prompts
    (COMPLETIONS, {**OK, "logprobs": 21}, "logprobs", "20", None),
    (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20", None),
    (COMPLETIONS, {**OK, "stop": [f"s{i}" for i in range(17)]}, "stop", "16", None),
    (CHAT, {**OK_CHAT, "stop": "x" * 257}, "stop", "256", None),
    (COMPLETIONS, {**OK, "stop": ["ok", "y" * 10_000]}, "stop", "256", None),
    (COMPLETIONS, {**OK, "stop_token_ids": list(range(65))}, "stop_token_ids", "64", None),
    (COMPLETIONS, {**OK, "prompt": "p" * 300}, "prompt", str(CONTEXT), "context_length_exceeded"),
    (COMPLETIONS, {**OK, "prompt": [97] * 300}, "prompt", str(CONTEXT), "context_length_exceeded"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "m" * 300}]}, "messages", str(CONTEXT),
     "context_length_exceeded"),
    (COMPLETIONS, {**OK, "max_tokens": 1000}, "max_tokens", str(CONTEXT), "context_length_exceeded"),
]


@pytest.mark.parametrize("route, body, param, limit, code", OVER_LIMITS,
                         ids=[f"{p}-{i}" for i, (_, _, p, _, _) in enumerate(OVER_LIMITS)])
def test_over_a_limit_is_400_naming_it(http, route, body, param, limit, code):
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert limit in error["message"] and len(error["message"]) < 400, error["message"]
    if code is not None:
        assert error["code"] == code


def test_values_at_the_limits_are_accepted(http):
    body = {"prompt": "q" * (CONTEXT - 3), "max_tokens": 3, "n": 2, "logprobs": 20, "ignore_eos": True,
            "stop": ["z" * 256] * 16, "stop_token_ids": list(range(1000, 1064))}
    reply = http.post(COMPLETIONS, json=body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert len(choices) == 2 and all(len(c["logprobs"]["top_logprobs"][0]) == 20 for c in choices)
    chat = http.post(CHAT, json={**OK_CHAT, "logprobs": True, "top_logprobs": 20})
    assert chat.status_code == 200, chat.text
    print(f"\n[security] limits: body {BODY_LIMIT} B (413, declared or chunked); n x prompts 64; logprobs 20; "
          f"16 stop strings of 256 chars; 64 stop_token_ids; prompt + max_tokens {CONTEXT} tokens: "
          f"{len(OVER_LIMITS)} over-limit requests -> 400 naming the field and the limit; at-limit requests -> 200")
