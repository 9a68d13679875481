"""`llmc bench`: workloads, roofline arithmetic, the GGUF writer, and one small run end to end.

Timings are not asserted (they depend on the machine); what is asserted is that every engine ran
the same requests, produced the requested token counts, and that the report's arithmetic holds.
"""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmc.bench import roofline
from llmc.bench.workloads import (OUTPUT_RANGE, PROMPT_RANGE, decode_request, poisson_arrivals,
                                  spread_requests)
from llmc.cli import app
from llmc.examples_tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("bench") / "tiny-llama")


def test_spread_requests_are_seeded_long_tailed_and_fit_the_model():
    a = spread_requests(1000, 400, max_model_len=4096, seed=3)
    assert a == spread_requests(1000, 400, max_model_len=4096, seed=3)
    assert a != spread_requests(1000, 400, max_model_len=4096, seed=4)
    prompts = np.array([len(r.prompt) for r in a])
    outputs = np.array([r.max_tokens for r in a])
    assert PROMPT_RANGE[0] <= prompts.min() and prompts.max() <= PROMPT_RANGE[1]
    assert OUTPUT_RANGE[0] <= outputs.min() and outputs.max() <= OUTPUT_RANGE[1]
    assert outputs.mean() > np.median(outputs)  # a right tail: the mean sits above the median
    assert all(0 <= t < 1000 for r in a for t in r.prompt)
    short = spread_requests(1000, 200, max_model_len=64)
    assert all(len(r.prompt) + r.max_tokens <= 63 for r in short)


def test_poisson_arrivals_have_the_asked_rate():
    requests = poisson_arrivals(spread_requests(100, 2000, max_model_len=4096), rate=4.0)
    times = np.array([r.arrival for r in requests])
    assert np.all(np.diff(times) > 0)
    assert abs(np.diff(times).mean() - 0.25) < 0.025  # 2000 exponential gaps: the mean is within 10%
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(requests, 0)


def test_decode_request_shape():
    r = decode_request(50, prompt_tokens=7, new_tokens=5)
    assert len(r.prompt) == 7 and r.max_tokens == 5 and r == decode_request(50, 7, 5)


def test_bandwidth_is_measured():
    assert roofline.measure_bandwidth(nbytes=16 << 20, repeats=3) > 1e8  # any machine copies > 100 MB/s


def test_decode_bytes_count_one_embedding_row_unless_the_table_is_also_the_lm_head(tmp_path, tiny_llama):
    from llmc.compiler import compile_model
    from llmc.runtime.llm import LLM

    untied = compile_model(tiny_llama, "cpu", tmp_path / "untied").out_dir
    weights = LLM(untied).engine.weights
    table = weights["model.embed_tokens.weight"]
    full = sum(t.numel() * t.element_size() for t in weights.values())
    row = table.shape[1] * table.element_size()
    assert roofline.decode_weight_bytes(untied, weights) == full - table.numel() * table.element_size() + row

    tied_ckpt = save_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    tied = compile_model(tied_ckpt, "cpu", tmp_path / "tied-pkg").out_dir
    weights = LLM(tied).engine.weights
    assert roofline.decode_weight_bytes(tied, weights) == sum(t.numel() * t.element_size() for t in weights.values())

    # 2 layers x 2 KV heads x (16 + 16) x float32 per cached token
    assert roofline.kv_bytes_per_context_token(untied) == 2 * 2 * 32 * 4
    assert roofline.decode_bytes_per_token(1000, 10, prompt_tokens=4, new_tokens=3) == 1000 + 10 * 5


def _hf_greedy(checkpoint, prompt, n):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("weight_type", ["f32", "bf16", "q8_0"])
def test_gguf_has_llama_cpp_names_and_rotary_permuted_rows(tmp_path, tiny_llama, weight_type):
    gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the gguf package (pip install 'llmc[bench]')")
    from safetensors.torch import load_file

    from llmc.bench.gguf_export import write_gguf

    path = write_gguf(tiny_llama, tmp_path / f"tiny-{weight_type}.gguf", weight_type)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} \
        <= set(tensors)
    assert len(tensors) == 2 + 1 + 2 * 9  # embeddings, final norm, lm head; 9 tensors per layer
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    hf = load_file(tiny_llama / "model.safetensors")
    q_hf = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_q.weight"].tensor_type)
    q = q.reshape(q_hf.shape)
    # llama.cpp pairs rotary dims (2i, 2i+1); HF pairs (i, i + d/2): row 1 of a head is HF's row d/2.
    # BF16: 8 significant bits (2^-8 relative); Q8_0: one int8 step of each block's max.
    tol = {"f32": 0, "bf16": np.abs(q_hf).max() / 256, "q8_0": np.abs(q_hf).max() / 100}[weight_type]
    assert np.allclose(q[1], q_hf[8], atol=tol) and np.allclose(q[0], q_hf[0], atol=tol)
    assert not np.allclose(q[1], q_hf[1], atol=tol)


def test_llama_cpp_reproduces_hf_greedy_tokens(tmp_path, tiny_llama):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llmc[bench]')")
    from llmc.bench.gguf_export import write_gguf

    prompt, n = list(range(3, 40)), 12
    llm = llama_cpp.Llama(model_path=str(write_gguf(tiny_llama, tmp_path / "t.gguf")), n_ctx=128, n_threads=1,
                          verbose=False)
    tokens = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(t))
        if len(tokens) == n:
            break
    assert tokens == _hf_greedy(tiny_llama, prompt, n)


def test_bench_cli_end_to_end_with_hf_baseline(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    md = tmp_path / "RESULTS.md"
    result = CliRunner().invoke(app, ["bench", str(tiny_llama), "-b", "hf", "-w", "decode", "-w", "offline",
                                      "--repeats", "1", "--requests", "3", "--batch", "2", "--decode-tokens", "6",
                                      "--json", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    decode = r["workloads"]["decode"]["engines"]
    assert set(decode) == {"llmc", "hf"}
    assert decode["llmc"]["tokens"] == decode["hf"]["tokens"] == 6
    assert decode["hf"]["agree_with_llmc"] == 6  # float32 on both sides: the same greedy tokens
    assert 0 < decode["llmc"]["roofline"] and math.isfinite(decode["llmc"]["tpot_s"])
    offline = r["workloads"]["offline"]
    requests = spread_requests(128, 3, max_model_len=256, seed=0)
    assert offline["useful_output_tokens"] == sum(q.max_tokens for q in requests)
    batches = [requests[i:i + 2] for i in range(0, 3, 2)]
    assert offline["engines"]["hf"]["wasted_tokens"] == sum(max(q.max_tokens for q in b) * len(b)
                                                            - sum(q.max_tokens for q in b) for b in batches)
    assert offline["engines"]["llmc"]["steps"] > 0
    assert "| decode b=1 (128+6) | hf |" in md.read_text()
    assert r["bandwidth_bytes_per_s"] > 1e8


@pytest.mark.slow
def test_bench_online_workload_serves_every_request(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_llama), "-b", "none", "-w", "online", "--requests", "6",
                                      "--rate", "20", "--rate", "50", "--json", str(out), "--plot-dir",
                                      str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    by_rate = json.loads(out.read_text())["workloads"]["online"]["engines"]["llmc"]
    assert set(by_rate) == {"20", "50"}
    for row in by_rate.values():
        assert row["failed"] == 0 and row["requests"] == 6
        assert len(row["ttft_samples_s"]) == 6 and row["ttft_s"]["p50"] > 0
        assert row["itl_samples_s"] and row["itl_s"]["p50"] > 0, "tokens must stream one chunk at a time"
        assert row["output_tokens_per_s"] > 0
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0


def test_bench_models_tokenizer_streams_text_for_every_token(tmp_path):
    """Without a tokenizer a package streams no text until the end, and the online workload would
    time the whole request as its first token: bench models carry a placeholder one."""
    from llmc.bench.models import placeholder_tokens, write_placeholder_tokenizer
    from llmc.runtime.detokenizer import IncrementalDetokenizer
    from llmc.runtime.tokenizer import PackageTokenizer

    write_placeholder_tokenizer(tmp_path, 1000)
    tokenizer = PackageTokenizer.from_dir(tmp_path)
    assert tokenizer.encode("\u2581t5 t999") == [5, 999] and len(placeholder_tokens(1000)) == 1000
    detokenizer = IncrementalDetokenizer(tokenizer, [4, 5])
    pieces = [detokenizer.add(t) for t in (10, 11, 999, 3)]
    assert all(pieces) and "".join(pieces) == " t10 t11 t999 t3"


@pytest.mark.parametrize("args, message", [
    (["bench", "llama-150m", "-b", "vllm"], "--baseline 'vllm'"),
    (["bench", "llama-150m", "-w", "training"], "--workload 'training'"),
    (["bench", "no-such-model"], "neither a directory nor a bench model"),
])
def test_bench_cli_rejects_bad_arguments_by_name(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_bench_of_a_package_without_checkpoint_skips_peers_and_says_why(tmp_path, tiny_llama, monkeypatch):
    from llmc.compiler import compile_model

    pkg = compile_model(tiny_llama, "cpu", tmp_path / "pkg").out_dir
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", str(pkg), "-b", "hf", "-w", "decode", "--repeats", "1",
                                      "--decode-tokens", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["workloads"]["decode"]["engines"]) == {"llmc"}
    assert "--model CHECKPOINT" in r["skipped"]["hf"]


@pytest.mark.parametrize("scheme, changed, want", [("bf16", True, "bf16"), ("int8", True, "q8_0"), ("w8a8", True, "q8_0"),
                                                   ("int4", True, "q4_0"), ("none", False, "f32")])
def test_llama_cpp_weights_match_the_package_precision(tmp_path, scheme, changed, want):
    import json

    from llmc.bench.runner import package_weight_type

    stats = {"scheme": scheme, "quantized": 3} if changed else {}
    plan = {"report": {"passes": [{"name": "canonicalize", "changed": True, "stats": {}},
                                  {"name": "quantize", "changed": changed, "stats": stats}]}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert package_weight_type(tmp_path) == want


def test_a_llama_cpp_that_fails_on_the_gguf_is_skipped_with_the_reason(tmp_path):
    """The peer is tried in a child process first: a crash there (a segfault in llama.cpp's native
    code, or here a file it cannot load) makes it a skipped peer, not a dead bench."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llmc[bench]')")
    from llmc.bench.engines import PeerUnavailable, _probe_llama_cpp

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(PeerUnavailable, match=r"llama.cpp crashed \(exit status 1\) running broken.gguf"):
        _probe_llama_cpp(bad, threads=1)
