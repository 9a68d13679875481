"""Malformed requests get a 4xx with OpenAI's error shape, never a 422 or a 500."""

from __future__ import annotations

import httpx
import pytest

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_COMPLETION = {"prompt": "abc", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# (route, body, param the error must name)
BAD_BODIES = [
    (COMPLETIONS, {"max_tokens": 2}, "prompt"),                                   # missing prompt
    (COMPLETIONS, {**OK_COMPLETION, "temperature": -0.5}, "temperature"),
    (COMPLETIONS, {**OK_COMPLETION, "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {**OK_COMPLETION, "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {**OK_COMPLETION, "top_p": 0}, "top_p"),
    (COMPLETIONS, {**OK_COMPLETION, "top_p": 1.5}, "top_p"),
    (COMPLETIONS, {**OK_COMPLETION, "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {**OK_COMPLETION, "max_tokens": "5"}, "max_tokens"),
    (COMPLETIONS, {**OK_COMPLETION, "max_tokens": True}, "max_tokens"),
    (COMPLETIONS, {**OK_COMPLETION, "n": 0}, "n"),
    (COMPLETIONS, {**OK_COMPLETION, "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {**OK_COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {**OK_COMPLETION, "stop": [""]}, "stop"),
    (COMPLETIONS, {**OK_COMPLETION, "stop": 5}, "stop"),
    (COMPLETIONS, {**OK_COMPLETION, "stream": "yes"}, "stream"),
    (COMPLETIONS, {**OK_COMPLETION, "seed": 1.5}, "seed"),
    (COMPLETIONS, {**OK_COMPLETION, "min_p": -1}, "min_p"),
    (COMPLETIONS, {**OK_COMPLETION, "repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"prompt": [], "max_tokens": 2}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"], "max_tokens": 2}, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "a"}, "max_tokens": 2}, "prompt"),
    (COMPLETIONS, {"prompt": [1000], "max_tokens": 2}, "prompt"),                # outside the vocab
    (COMPLETIONS, {"prompt": "", "max_tokens": 2}, "prompt"),                    # empty after encoding
    (COMPLETIONS, {**OK_COMPLETION, "max_token": 5}, "max_token"),              # unknown field (a typo)
    (COMPLETIONS, {**OK_COMPLETION, "echo": True}, "echo"),                     # accepted only as false
    (COMPLETIONS, {**OK_COMPLETION, "logit_bias": {"1": 5}}, "logit_bias"),
    (COMPLETIONS, {**OK_COMPLETION, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    (COMPLETIONS, {**OK_COMPLETION, "stream_options": {"bogus": True}}, "stream_options.bogus"),
    (CHAT, {"max_tokens": 2}, "messages"),
    (CHAT, {"messages": [], "max_tokens": 2}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    (CHAT, {"messages": [{"role": "user"}], "bogus": 1}, "bogus"),
    (CHAT, {**OK_CHAT, "logprobs": 3}, "logprobs"),                             # a bool for chat
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, "top_logprobs"),                     # needs logprobs: true
    (CHAT, {**OK_CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    (CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("route,body,param", BAD_BODIES, ids=[f"{'chat' if r == CHAT else 'completions'}-{p}-{i}"
                                                              for i, (r, _, p) in enumerate(BAD_BODIES)])
def test_bad_request_is_400(http, route, body, param):
    assert_error(http.post(route, json=body), 400, param=param)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_body_that_is_not_a_json_object_is_400(http, raw):
    response = http.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, code="invalid_json")


def test_nan_temperature_is_400(http):
    raw = b'{"prompt": "abc", "max_tokens": 2, "temperature": NaN}'
    assert_error(http.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"}), 400,
                 param="temperature")


def test_non_json_content_type_is_415(http):
    assert_error(http.post(COMPLETIONS, content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}), 415)


def test_body_over_the_limit_is_413(http):
    big = {"prompt": "a" * (1 << 20), "max_tokens": 1}
    assert_error(http.post(COMPLETIONS, json=big), 413)


def test_unknown_model_is_400(http):
    assert_error(http.post(COMPLETIONS, json={**OK_COMPLETION, "model": "gpt-4"}), 400, param="model",
                 code="model_not_found")
    assert_error(http.post(CHAT, json={**OK_CHAT, "model": "gpt-4"}), 400, param="model", code="model_not_found")


def test_max_tokens_beyond_the_context_is_400(http):
    # 3 prompt tokens + 254 > 256 positions
    assert_error(http.post(COMPLETIONS, json={"prompt": "abc", "max_tokens": 254}), 400, param="max_tokens",
                 code="context_length_exceeded")
    assert_error(http.post(CHAT, json={**OK_CHAT, "max_tokens": 10_000}), 400, param="max_tokens",
                 code="context_length_exceeded")
    assert http.post(COMPLETIONS, json={"prompt": "abc", "max_tokens": 253}).status_code == 200


def test_prompt_longer_than_the_context_is_400(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": "a" * 300}), 400, param="prompt",
                 code="context_length_exceeded")
    assert_error(http.post(CHAT, json={"messages": [{"role": "user", "content": "a" * 300}]}), 400,
                 param="messages", code="context_length_exceeded")


def test_default_max_tokens_shrinks_to_fit_the_context(http):
    reply = http.post(COMPLETIONS, json={"prompt": "a" * 250, "temperature": 0, "ignore_eos": True}).json()
    assert reply["usage"]["completion_tokens"] == 6  # OpenAI's default 16 cut to the 6 positions left


def test_unknown_route_and_method_have_the_error_shape(http):
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = http.get(COMPLETIONS)
    assert response.status_code == 405 and "error" in response.json()


def test_null_means_default(http):
    reply = http.post(COMPLETIONS, json={**OK_COMPLETION, "temperature": None, "stop": None, "seed": None,
                                         "logprobs": None, "user": None})
    assert reply.status_code == 200, reply.text
