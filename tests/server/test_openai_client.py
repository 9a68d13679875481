"""The official ``openai`` client against ``python PKG serve``'s app: completions, chat, streaming."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_package(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.app.state.served.model_name]
    assert models[0].object == "model" and models[0].max_model_len == 256
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_greedy_and_streamed_agree(client, model):
    whole = client.completions.create(model=model, prompt="def main", max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == model
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens == len("def main")  # char tokenizer: one token per character
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(model=model, prompt="def main", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.id == chunks[0].id for c in chunks)


def test_chat_greedy_and_streamed_agree(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    # The tiny template: "<role>content\n" per message, then "<assistant>".
    assert whole.usage.prompt_tokens == len("<system>be brief\n<user>hello\n<assistant>")

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_completion_tokens_bounds_chat(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_token_id_prompt_and_prompt_list(client, model):
    by_text = client.completions.create(model=model, prompt="abc", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=model, prompt=[97, 98, 99], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=model, prompt=["abc", "xyz"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == 6


def test_n_choices_with_seeds(client, model):
    reply = client.completions.create(model=model, prompt="abc", max_tokens=8, n=3, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    again = client.completions.create(model=model, prompt="abc", max_tokens=8, n=3, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seed + i per choice
    assert reply.usage.completion_tokens == 24


def test_seeded_sampling_is_reproducible(client, model):
    texts = {client.completions.create(model=model, prompt="abc", max_tokens=10, temperature=1.0, seed=3,
                                       top_p=0.9).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_stop_string_ends_the_completion(client, model):
    free = client.completions.create(model=model, prompt="abc", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(free) >= 4
    stop = free[2:4]
    stopped = client.completions.create(model=model, prompt="abc", max_tokens=20, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[:free.index(stop)]


def test_completion_logprobs(client, model):
    reply = client.completions.create(model=model, prompt="abc", max_tokens=4, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_ignored_openai_fields_are_accepted(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           user="someone", store=False, metadata={"k": "v"}, logit_bias={},
                                           parallel_tool_calls=True, response_format={"type": "text"})
    assert reply.choices[0].message.content is not None


def test_text_content_parts(client, model):
    parts = [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]
    a = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                       max_tokens=5, temperature=0)
    b = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_sse_wire_format(server, model):
    body = {"model": model, "prompt": "ab", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
