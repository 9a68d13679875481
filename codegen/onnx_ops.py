"""The ONNX form of each IR op (``codegen/onnx_export.py`` walks the graph and calls these).

One emitter per op, each with a one-line comment giving the rewrite. Activations stay ``[T, F]``;
the opset-23 ops that want ``[batch, seq, hidden]`` (Attention, RotaryEmbedding) get a unit batch
axis added and removed around them. Numerics follow the IR references: norms and attention in
float32, rotary tables from ``positions * inv_freq`` computed in the graph.
"""

from __future__ import annotations

import torch

from llmc.codegen.onnx_export import MS_DOMAIN, ONNX_DTYPES, OnnxEmitter, emits, kv_names
from llmc.errors import LlmcError

FLOAT = ONNX_DTYPES["float32"]
FP8_MAX = 448.0


def _features(em: OnnxEmitter, ref: str) -> int:
    return em.graph.type_of(ref).shape[1]


def _act_dtype(em: OnnxEmitter, ref: str) -> torch.dtype:
    return em.graph.type_of(ref).torch_dtype


# ---- plumbing and elementwise ----------------------------------------------------------------

@emits("embedding")  # embedding(ids, W) -> Gather(W, ids, axis=0)
def embedding(em, node, ins, attrs):
    return em.node("Gather", [ins[1], ins[0]], axis=0)


@emits("linear")  # x @ W.T + b -> Gemm(x, W, b, transB=1): W keeps the IR's [out, in] layout
def linear(em, node, ins, attrs):
    return em.node("Gemm", ins, transB=1)


@emits("add")  # a + b -> Add
def add(em, node, ins, attrs):
    return em.node("Add", ins)


@emits("mul")  # a * b -> Mul
def mul(em, node, ins, attrs):
    return em.node("Mul", ins)


def activation(em: OnnxEmitter, act: str, x: str) -> str:
    if act == "silu":  # silu(x) = x * sigmoid(x): no standard Silu op in opset 23
        return em.node("Mul", [x, em.node("Sigmoid", [x])])
    if act in ("gelu", "gelu_tanh"):
        return em.node("Gelu", [x], approximate="tanh" if act == "gelu_tanh" else "none")
    return em.node({"relu": "Relu", "tanh": "Tanh"}[act], [x])


@emits("silu", "gelu", "gelu_tanh", "relu", "tanh")  # act(x) -> Mul(x, Sigmoid(x)) / Gelu / Relu / Tanh
def unary(em, node, ins, attrs):
    return activation(em, node.op.name, ins[0])


@emits("scale")  # x * c -> Mul(x, c)
def scale(em, node, ins, attrs):
    return em.node("Mul", [ins[0], em.const(attrs["factor"], _act_dtype(em, node.inputs[0]))])


@emits("slice")  # x[:, a:b] -> Slice(x, [a], [b], axes=[1])
def slice_(em, node, ins, attrs):
    return em.node("Slice", [ins[0], em.const([attrs["start"]]), em.const([attrs["stop"]]), em.const([1])])


@emits("cast")  # cast(x, dtype) -> Cast(to=dtype)
def cast(em, node, ins, attrs):
    return em.node("Cast", ins, to=ONNX_DTYPES[attrs["dtype"]])


@emits("select_rows")  # select_rows(x) -> x: one sequence per run, so every row is sampled
def select_rows(em, node, ins, attrs):
    return em.node("Identity", ins)


@emits("act_mul")  # act(gate) * up -> Mul(act(gate), up)
def act_mul(em, node, ins, attrs):
    return em.node("Mul", [activation(em, attrs["act"], ins[0]), ins[1]])


@emits("act_mul_packed")  # act(x[:, :I]) * x[:, I:] -> Split(x, 2, axis=1); Mul(act(gate), up)
def act_mul_packed(em, node, ins, attrs):
    gate, up = em.node("Split", ins, 2, axis=1, num_outputs=2)
    return em.node("Mul", [activation(em, attrs["act"], gate), up])


# ---- normalization ---------------------------------------------------------------------------

def _norm_scale(em: OnnxEmitter, node, weight: str, offset: float) -> str:
    """Gemma's ``(offset + w)``: an Add in the graph, so the weight keeps its checkpoint values."""
    if not offset:
        return weight
    return em.node("Add", [weight, em.const(offset, em.graph.type_of(node.inputs[-1]).torch_dtype)])


def rms(em: OnnxEmitter, x: str, scale: str, features: int, group: int, eps: float) -> str:
    if group == features:
        return em.node("RMSNormalization", [x, scale], axis=-1, epsilon=eps)
    grouped = em.node("Reshape", [x, em.const([0, features // group, group])])  # per-head norms (Qwen3)
    normed = em.node("RMSNormalization", [grouped, scale], axis=-1, epsilon=eps)
    return em.node("Reshape", [normed, em.const([0, features])])


@emits("rms_norm")  # rms_norm(x, w) -> RMSNormalization(x, offset + w) (float32 inside: stash_type=1)
def rms_norm(em, node, ins, attrs):
    scale = _norm_scale(em, node, ins[1], attrs["offset"])
    return rms(em, ins[0], scale, _features(em, node.inputs[0]), em.graph.type_of(node.inputs[1]).shape[0],
               attrs["eps"])


@emits("add_rms_norm")  # s = x + r; [rms_norm(s) | s] -> Add; RMSNormalization; Concat(axis=1)
def add_rms_norm(em, node, ins, attrs):
    summed = em.node("Add", ins[:2])
    h = _features(em, node.inputs[0])
    normed = rms(em, summed, _norm_scale(em, node, ins[2], attrs["offset"]), h, h, attrs["eps"])
    return em.node("Concat", [normed, summed], axis=1)


@emits("layer_norm")  # layer_norm(x, w, b) -> LayerNormalization(axis=-1)
def layer_norm(em, node, ins, attrs):
    return em.node("LayerNormalization", ins, axis=-1, epsilon=attrs["eps"])


# ---- rotary and attention ------------------------------------------------------------------------

def rope_tables(em: OnnxEmitter, inv_freq: str, scaling: float, dtype: torch.dtype) -> tuple[str, str]:
    """cos/sin ``[1, T, rotary_dim / 2]`` of ``positions * inv_freq`` (times ``scaling``), made once."""

    def build() -> tuple[str, str]:
        pos = em.cached(("positions_f32",), lambda: em.node(
            "Unsqueeze", [em.node("Cast", ["positions"], to=FLOAT), em.const([0, 2])]))  # [1, T, 1]
        freqs = em.node("Mul", [pos, inv_freq])
        tables = []
        for fn in ("Cos", "Sin"):
            table = em.node(fn, [freqs])
            if scaling != 1.0:
                table = em.node("Mul", [table, em.const(scaling, torch.float32)])
            if dtype != torch.float32:
                table = em.node("Cast", [table], to=ONNX_DTYPES[str(dtype).removeprefix("torch.")])
            tables.append(table)
        return tuple(tables)

    return em.cached(("rope", inv_freq, scaling, dtype), build)


def apply_rope(em: OnnxEmitter, x: str, inv_freq: str, dtype: torch.dtype, features: int, head_dim: int,
               rotary_dim: int, interleaved: bool, scaling: float) -> str:
    cos, sin = rope_tables(em, inv_freq, scaling, dtype)
    partial = {"rotary_embedding_dim": rotary_dim} if rotary_dim != head_dim else {}
    roped = em.node("RotaryEmbedding", [em.node("Unsqueeze", [x, em.const([0])]), cos, sin],
                    num_heads=features // head_dim, interleaved=int(interleaved), **partial)
    return em.node("Squeeze", [roped, em.const([0])])


@emits("rope")  # rope(x, positions, inv_freq) -> RotaryEmbedding(x[None], cos, sin)
def rope(em, node, ins, attrs):
    return apply_rope(em, ins[0], ins[2], _act_dtype(em, node.inputs[0]), _features(em, node.inputs[0]),
                      attrs["head_dim"], attrs["rotary_dim"], attrs["interleaved"], attrs["scaling"])


def attention_mask(em: OnnxEmitter, past_key: str, causal: bool, window: int | None) -> str:
    """Bool ``[T, P + T]``: key j (at position j) is visible to the query at position p when
    ``j <= p`` (causal) and ``p - j < window``; "" (no mask) when every key is visible."""
    if not causal and not window:
        return ""

    def build() -> str:
        total = em.node("Add", [em.node("Shape", [past_key], start=2, end=3), em.node("Shape", ["positions"])])
        kpos = em.node("Range", [em.const(0), em.node("Squeeze", [total, em.const([0])]), em.const(1)])
        keys, queries = em.node("Unsqueeze", [kpos, em.const([0])]), em.node("Unsqueeze", ["positions", em.const([1])])
        allowed = em.node("LessOrEqual", [keys, queries]) if causal else None
        if window:
            near = em.node("Less", [em.node("Sub", [queries, keys]), em.const(window)])
            allowed = near if allowed is None else em.node("And", [allowed, near])
        return allowed

    return em.cached(("mask", causal, window), build)


def fake_quantize_kv(em: OnnxEmitter, x: str, scale: tuple[float, ...], kv_dtype: str, features: int) -> str:
    """What a quantized cache page gives back (``functional.quantize_kv`` then ``dequantize_kv``):
    the values round-trip through the storage dtype, and the present outputs keep them as floats."""
    kvh = len(scale)
    heads = em.node("Reshape", [x, em.const([0, kvh, features // kvh])])
    s = em.const([[v] for v in scale], torch.float32)
    y = em.node("Div", [heads, s])
    if kv_dtype == "int8":
        q = em.node("Clip", [em.node("Round", [y]), em.const(-127.0, torch.float32), em.const(127.0, torch.float32)])
    else:  # float8_e4m3fn: clamp to its largest finite value; the cast rounds to nearest even
        clipped = em.node("Clip", [y, em.const(-FP8_MAX, torch.float32), em.const(FP8_MAX, torch.float32)])
        q = em.node("Cast", [em.node("Cast", [clipped], to=ONNX_DTYPES["float8_e4m3fn"])], to=FLOAT)
    return em.node("Reshape", [em.node("Mul", [q, s]), em.const([0, features])])


@emits("attention", "paged_attention")  # attention(q, k, v) -> [RotaryEmbedding q, k;] Attention(past, present)
def attention(em, node, ins, attrs):
    q, k, v = ins[:3]
    h, kvh, d, layer = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"], attrs["layer"]
    dtype = _act_dtype(em, node.inputs[0])
    if attrs["rope_dim"]:
        rope_args = (ins[4], dtype)
        q = apply_rope(em, q, *rope_args, h * d, d, attrs["rope_dim"], attrs["rope_interleaved"], attrs["rope_scaling"])
        k = apply_rope(em, k, *rope_args, kvh * d, d, attrs["rope_dim"], attrs["rope_interleaved"],
                       attrs["rope_scaling"])
    dv = _features(em, node.inputs[2]) // kvh
    if attrs["kv_dtype"]:
        k = fake_quantize_kv(em, k, attrs["k_scale"], attrs["kv_dtype"], kvh * d)
        v = fake_quantize_kv(em, v, attrs["v_scale"], attrs["kv_dtype"], kvh * dv)
    if layer in em.kv_layers:
        raise LlmcError(f"ONNX export: attention {node.ref} reuses KV layer {layer}; each layer needs its own "
                        "past/present inputs")
    em.kv_layers[layer] = (kvh, d, dv)
    past_k, past_v, present_k, present_v = kv_names(layer)
    mask = attention_mask(em, past_k, attrs["causal"], attrs["sliding_window"])
    batched = [em.node("Unsqueeze", [t, em.const([0])]) for t in (q, k, v)]
    softcap = {"softcap": float(attrs["softcap"])} if attrs["softcap"] else {}
    out = em.fresh(f"attention_{node.name}/out")
    em.node("Attention", [*batched, mask, past_k, past_v], [out, present_k, present_v], q_num_heads=h,
            kv_num_heads=kvh, scale=float(attrs["scale"]), **softcap)
    return em.node("Squeeze", [out, em.const([0])])


# ---- quantized linears ---------------------------------------------------------------------------

def _dequantized_gemm(em: OnnxEmitter, node, ins: list[str]) -> str:
    """w = DequantizeLinear(q, scale, axis=0) (per output channel); Gemm(x, w, b, transB=1)."""
    weight = em.node("DequantizeLinear", [ins[1], ins[2]], axis=0)
    dtype = _act_dtype(em, node.inputs[0])
    if dtype != torch.float32:
        weight = em.node("Cast", [weight], to=ONNX_DTYPES[str(dtype).removeprefix("torch.")])
    return em.node("Gemm", [ins[0], weight, *ins[3:]], transB=1)


@emits("linear_bf16")  # bf16(bf16(x) @ W.T) + b: the roundings as Casts around a Gemm in x's dtype
def linear_bf16(em, node, ins, attrs):
    act = ONNX_DTYPES[str(_act_dtype(em, node.inputs[0])).removeprefix("torch.")]
    bf16 = ONNX_DTYPES["bfloat16"]
    x = em.node("Cast", [em.node("Cast", [ins[0]], to=bf16)], to=act)
    y = em.node("Gemm", [x, em.node("Cast", [ins[1]], to=act)], transB=1)
    y = em.node("Cast", [em.node("Cast", [y], to=bf16)], to=act)
    return em.node("Add", [y, ins[2]]) if len(ins) > 2 else y


@emits("linear_int8")  # x @ (q * s).T + b -> DequantizeLinear(q int8, s, axis=0); Gemm(transB=1)
def linear_int8(em, node, ins, attrs):
    return _dequantized_gemm(em, node, ins)


@emits("linear_fp8")  # x @ (q * s).T + b -> DequantizeLinear(q float8e4m3fn, s, axis=0); Gemm(transB=1)
def linear_fp8(em, node, ins, attrs):
    return _dequantized_gemm(em, node, ins)


def matmulnbits_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """llmc int4 (``runtime/quant.py``) -> MatMulNBits' B, scales and zero_points.

    B is ``[N, K / g, g / 2]``: the same bytes, since both put element 2j in the low nibble of byte j.
    scales flatten to ``[N * K / g]``. zero_points pack two blocks per byte, block 2b in the low
    nibble, rows padded to whole bytes: ``[N * ceil(K / g / 2)]``."""
    n, blocks = scales.shape
    b = qweight.reshape(n, blocks, group // 2).contiguous()
    z = zeros.to(torch.uint8)
    if blocks % 2:
        z = torch.cat((z, torch.zeros(n, 1, dtype=torch.uint8)), dim=1)
    packed = z[:, 0::2] | (z[:, 1::2] << 4)
    return b, scales.float().reshape(-1).contiguous(), packed.reshape(-1).contiguous()


@emits("linear_int4")  # x @ ((q - z) * s).T + b -> com.microsoft.MatMulNBits(bits=4, block_size=g)
def linear_int4(em, node, ins, attrs):
    group = attrs["group_size"]
    params = [em.graph.param_map[r[1:]] for r in node.inputs[1:4]]
    out, half = params[0].type.shape
    storage = matmulnbits_storage(*(p.load() for p in params), group)
    names = [em.initializer(p.name, t) for p, t in zip(params, storage)]  # IR names: the importer undoes it
    bias = ins[4:5]
    return em.node("MatMulNBits", [ins[0], *names, *([""] + bias if bias else [])], domain=MS_DOMAIN,
                   K=half * 2, N=out, bits=4, block_size=group)
