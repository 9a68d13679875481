"""The offline API as a user meets it: ``from <package> import LLM, SamplingParams``."""

from __future__ import annotations

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import char_tokenizer, save_tiny_model
from package_helpers import import_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    save_tiny_model("qwen2", root / "model")
    compile_model(root / "model", "cpu", root / "pkg")
    return import_package(root / "pkg", "tiny_qwen2_offline")


def test_generate_text_prompts_in_order(package):
    llm = package.LLM()
    prompts = ["Hello", "def main():", "x"]
    outs = llm.generate(prompts, package.SamplingParams(max_tokens=6))
    assert [o.prompt_token_ids for o in outs] == [[ord(c) for c in p] for p in prompts]
    for out, prompt in zip(outs, prompts):
        alone = llm.generate(prompt, package.SamplingParams(max_tokens=6))[0]
        assert out.output_token_ids == alone.output_token_ids and len(out.output_token_ids) == 6
        assert out.text == char_tokenizer().decode(out.output_token_ids) and out.finish_reason == "length"
    assert llm.metrics()["kv_usage"] == 0


def test_stop_strings_token_ids_and_per_prompt_params(package):
    llm = package.LLM()
    full = llm.generate([[1, 2, 3]], package.SamplingParams(max_tokens=12))[0]
    stop_text = full.text[3:5]
    cut = llm.generate([[1, 2, 3]], package.SamplingParams(max_tokens=12, stop=[stop_text]))[0]
    assert cut.finish_reason == "stop" and stop_text not in cut.text and full.text.startswith(cut.text)
    stop_id = full.output_token_ids[4]
    by_id = llm.generate([[1, 2, 3]], package.SamplingParams(max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert by_id.output_token_ids == full.output_token_ids[: full.output_token_ids.index(stop_id) + 1]
    two = llm.generate([[1, 2, 3], [4, 5]], [package.SamplingParams(max_tokens=2), package.SamplingParams(max_tokens=5)])
    assert [len(o.output_token_ids) for o in two] == [2, 5]
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1]], [package.SamplingParams(), package.SamplingParams()])


def test_chat_renders_the_template(package):
    llm = package.LLM()
    reply = llm.chat([{"role": "user", "content": "hi"}], package.SamplingParams(max_tokens=3))[0]
    assert reply.prompt_token_ids == [ord(c) for c in "<user>hi\n<assistant>"]
    assert len(reply.output_token_ids) == 3


def test_logprobs_are_returned_per_token(package):
    llm = package.LLM()
    out = llm.generate([[7, 8, 9]], package.SamplingParams(max_tokens=4, logprobs=3))[0]
    assert [lp.token_id for lp in out.logprobs] == out.output_token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob == pytest.approx(lp.top[0][1])  # greedy picks the most likely token
    assert llm.generate([[7, 8, 9]], package.SamplingParams(max_tokens=2))[0].logprobs is None
