"""quantize_kv on tiny models: numbers vs the reference interpreter (contiguous cache and int8/fp8
pages agree; vs the unquantized graph only a little), match counts, ops before/after; the engine's
pages are int8 and the same bytes hold 4x the tokens; a compiled package generates the same
greedy tokens as the interpreter.

Tolerances: the contiguous reference keeps ``dequantize(quantize(k))`` in float32 and the paged
runtime reads the same quantized values back from its pages, so the two differ only by float32
summation order (as in test_attention_lowering: ~1e-7; 1e-5 leaves margin). Against the
unquantized graph, int8 rounding moves each cached value by at most half a step (1/254 of the
head's range) and fp8 by 2^-4 of its magnitude: on the trained example model that is a mean
KL(unquantized || quantized) of ~1e-4 (int8) and ~5e-4 (fp8) nats per token (measured; the bounds
below leave ~5x margin), with the same top-1 token almost everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmc.calibration import CalibrationOptions
from llmc.compiler import compile_model
from llmc.errors import IRError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import ExecutionContext, Interpreter, generate_greedy, verify
from llmc.pipeline import PASSES, PassContext
from llmc.runtime import evaluate as ev
from llmc.runtime.engine import EngineConfig, LLMEngine
from llmc.runtime.sampler import SamplingParams
from llmc.target import load_target
from package_helpers import lowered, target_with

ATOL = 1e-5
PROMPTS = [[5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120, 45, 6, 23], [7], [100, 3, 3, 3, 56, 2, 9]]
SMALL_CALIBRATION = CalibrationOptions(source="random", sequences=4, length=32)
KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
EXAMPLE_MODEL = Path(__file__).parents[2] / "examples" / "models" / "stdlib-llama-6m"
EXAMPLE_KL_BOUND = {"int8": 5e-4, "fp8": 3e-3}


def run_pass(graph, **options):
    info = PASSES["quantize_kv"]
    options.setdefault("calibration", SMALL_CALIBRATION)
    return info.fn(graph, PassContext(target=load_target("cpu"), options=info.options(**options)))


def prefill_logits(graph, ids):
    inputs = {"input_ids": torch.tensor(ids), "positions": torch.arange(len(ids))}
    return Interpreter(graph).run(inputs, ExecutionContext.for_graph(graph))["logits"].float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_hf(save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "llama")).graph


_QUANTIZED: dict[str, object] = {}


def quantize_tiny(tiny, scheme):
    """The pass's result on the tiny model, once per scheme."""
    if scheme not in _QUANTIZED:
        _QUANTIZED[scheme] = run_pass(tiny, scheme=scheme)
    return _QUANTIZED[scheme]


@pytest.fixture(scope="module", params=["int8", "fp8"])
def quantized(request, tiny):
    return request.param, quantize_tiny(tiny, request.param)


def test_every_attention_gets_its_scales_and_nothing_else_changes(tiny, quantized):
    scheme, result = quantized
    verify(result.graph)
    layers = tiny.op_counts()["attention"]
    assert layers == 2
    assert result.changed and result.stats["quantized"] == layers
    assert result.stats["kv_dtype"] == result.graph.meta["kv_dtype"] == str(KV_DTYPES[scheme])[6:]
    assert result.stats["calibration"] == "random ids" and result.stats["tokens"] == 4 * 32
    assert result.graph.op_counts() == tiny.op_counts()
    for before, after in zip(tiny.nodes, result.graph.nodes):
        assert (before.op, before.inputs, before.type) == (after.op, after.inputs, after.type)
        changed = {k for k, v in after.attrs if before.attr_dict[k] != v}
        if after.op.name == "attention":
            assert changed == {"kv_dtype", "k_scale", "v_scale"}
            assert len(after.attr("k_scale")) == len(after.attr("v_scale")) == after.attr("num_kv_heads")
        else:
            assert not changed


def test_scales_are_the_absmax_of_what_each_head_caches(tiny):
    """Read the k/v inputs of each attention node (rope is its own op here, so they are what the
    cache stores) over the same calibration sequences: scale = max |x| of the head / 127."""
    from llmc.calibration import calibration_set

    result = quantize_tiny(tiny, "int8")
    attention = [n for n in tiny.nodes if n.op.name == "attention"]
    absmax = {n.ref: [torch.zeros(2), torch.zeros(2)] for n in attention}
    for seq in calibration_set(tiny, SMALL_CALIBRATION).sequences:
        env = Interpreter(tiny).run({"input_ids": torch.tensor(seq), "positions": torch.arange(len(seq))},
                                    keep=True)
        for n in attention:
            for i, ref in enumerate(n.inputs[1:3]):
                x = env[ref].reshape(len(seq), 2, -1).abs().amax(dim=(0, 2))
                absmax[n.ref][i] = torch.maximum(absmax[n.ref][i], x)
    by_ref = {n.ref: n for n in result.graph.nodes}
    for ref, (k_max, v_max) in absmax.items():
        assert torch.allclose(torch.tensor(by_ref[ref].attr("k_scale")), k_max / 127, rtol=1e-6)
        assert torch.allclose(torch.tensor(by_ref[ref].attr("v_scale")), v_max / 127, rtol=1e-6)


def test_percentile_clips_below_the_absmax(tiny):
    full = quantize_tiny(tiny, "int8").graph
    clipped = run_pass(tiny, scheme="int8", percentile=99.0).graph
    for a, b in zip(full.nodes, clipped.nodes):
        if a.op.name == "attention":
            for name in ("k_scale", "v_scale"):
                assert all(c < f for c, f in zip(b.attr(name), a.attr(name)))


def test_scheme_none_leaves_the_graph_alone(tiny):
    result = run_pass(tiny)
    assert result.graph is tiny and not result.changed and result.stats == {"quantized": 0}


def test_contiguous_and_paged_caches_agree(quantized):
    scheme, result = quantized
    paged = lowered(result.graph)
    for prompt in PROMPTS[:2]:
        steps_c, steps_p = [], []
        tokens_c, prefill_c = generate_greedy(result.graph, prompt, 6, step_logits=steps_c)
        tokens_p, prefill_p = generate_greedy(paged, prompt, 6, step_logits=steps_p)
        assert tokens_c == tokens_p
        assert (prefill_c - prefill_p).abs().max().item() < ATOL
        assert max((a - b).abs().max().item() for a, b in zip(steps_c, steps_p)) < ATOL
    ctx = ExecutionContext.for_graph(paged)
    Interpreter(paged).run({"input_ids": torch.tensor(PROMPTS[0]), "positions": torch.arange(len(PROMPTS[0]))}, ctx)
    assert {p.dtype for p in (*ctx.kv.pool.k.values(), *ctx.kv.pool.v.values())} == {KV_DTYPES[scheme]}


def test_quantized_logits_move_only_a_little(tiny, quantized):
    """Random tiny weights, |logits| <= ~0.5: the rounding shows (measured max error 0.7% of the
    largest logit for int8, 2.4% for fp8, calibrated on only 128 random tokens) but stays small."""
    scheme, result = quantized
    reference = prefill_logits(tiny, PROMPTS[0])
    diff = (prefill_logits(result.graph, PROMPTS[0]) - reference).abs().max().item()
    assert 0 < diff < (0.02 if scheme == "int8" else 0.06) * reference.abs().max().item()


def test_bad_scales_are_rejected_by_the_verifier(quantized):
    _, result = quantized
    node = next(n for n in result.graph.nodes if n.op.name == "attention")
    with pytest.raises(IRError, match="k_scale must be a tuple of 2"):
        node.op.infer([result.graph.type_of(r) for r in node.inputs], {**node.attr_dict, "k_scale": (0.1,)})
    with pytest.raises(IRError, match="kv_dtype 'int4'"):
        node.op.infer([result.graph.type_of(r) for r in node.inputs], {**node.attr_dict, "kv_dtype": "int4"})


@pytest.mark.slow
def test_example_model_kl_stays_small():
    """The trained example model, calibrated on 4 x 64 train tokens, scored on held-out text."""
    graph = load_hf(EXAMPLE_MODEL).graph
    tokenizer, split = ev.load_tokenizer(EXAMPLE_MODEL), ev.load_split(EXAMPLE_MODEL)
    bos, eos = ev.boundary_ids(EXAMPLE_MODEL, tokenizer)
    ids = ev.heldout_stream(tokenizer, split, ev.default_data_root(), 2 * 96, bos, eos).ids
    prompts = [ids[:96], ids[96:192]]
    reference = [prefill_logits(graph, p).log_softmax(-1) for p in prompts]
    for scheme, bound in EXAMPLE_KL_BOUND.items():
        result = run_pass(graph, scheme=scheme, calibration=CalibrationOptions(sequences=4, length=64))
        assert result.stats["calibration"].startswith("train files")
        kl, agree = [], []
        for p, ref in zip(prompts, reference):
            logp = prefill_logits(result.graph, p).log_softmax(-1)
            kl.append((ref.exp() * (ref - logp)).sum(-1).mean().item())
            agree.append((logp.argmax(-1) == ref.argmax(-1)).float().mean().item())
        assert 0 < sum(kl) / len(kl) < bound, (scheme, kl)
        assert min(agree) >= 0.95, (scheme, agree)


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory):
    """A tiny llama compiled with quantize_kv in the pipeline, switched on with ``--set``."""
    root = tmp_path_factory.mktemp("kv-int8")
    model = save_tiny_model("llama", root / "model")
    calibration = SMALL_CALIBRATION.model_dump()
    _, target = target_with(root, [{"pass": "canonicalize"},
                                   {"pass": "quantize_kv", "options": {"calibration": calibration}},
                                   {"pass": "attention_lowering"}, {"pass": "select_logits"}])
    result = compile_model(model, target, root / "pkg", overrides=["quantize_kv.scheme=int8"])
    return root / "pkg", result.graph


def test_package_plan_and_pool_hold_int8_pages(int8_package):
    package, graph = int8_package
    plan = json.loads((package / "plan.json").read_text())
    assert plan["kv_cache"]["dtype"] == "int8"
    source = (package / "model.py").read_text()
    assert "kv_dtype='int8'" in source
    # the per-head scales differ per layer but are data, not code: one layer function reads them
    assert source.count("def llama_decoder_layer") == 1 and "k_scale=LAYER_ATTRS['k_scale'][layer]" in source
    engine = LLMEngine.from_package(package)
    assert engine.dtype == torch.float32 and engine.kv_dtype == torch.int8
    assert {p.dtype for p in (*engine.pool.k.values(), *engine.pool.v.values())} == {torch.int8}
    assert "int8" in engine.kv_report()


def test_same_kv_bytes_hold_4x_the_pages(int8_package):
    package, _ = int8_package
    quantized = LLMEngine.from_package(package)
    plan = json.loads((package / "plan.json").read_text())
    plan["kv_cache"]["dtype"] = None   # the same model with float32 pages
    float_bytes = LLMEngine(quantized.forward, quantized.weights, plan, device=torch.device("cpu")).kv_cache_bytes
    per_float_block = float_bytes // LLMEngine(quantized.forward, quantized.weights, plan,
                                               device=torch.device("cpu")).blocks.num_blocks
    config = EngineConfig(kv_cache_bytes=100 * per_float_block)
    fp32 = LLMEngine(quantized.forward, quantized.weights, plan, device=torch.device("cpu"), config=config)
    int8 = LLMEngine.from_package(package, config=config)
    assert fp32.blocks.num_blocks == 100 and int8.blocks.num_blocks == 400
    assert int8.kv_cache_bytes == fp32.kv_cache_bytes


def test_engine_batches_the_same_greedy_tokens_as_the_interpreter(int8_package):
    package, graph = int8_package
    engine = LLMEngine.from_package(package)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=8))
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out.output_token_ids for out in engine.step() if out.finished})
    for i, prompt in enumerate(PROMPTS):
        assert done[str(i)] == generate_greedy(graph, prompt, 8)[0], f"prompt {i}"
