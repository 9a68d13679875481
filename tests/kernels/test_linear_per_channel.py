"""The per-output-channel weight-only Triton kernels, W8A16 (codegen/templates/triton/linear_int8.py.jinja)
and fp8 e4m3 (linear_fp8.py.jinja), vs quant.linear_int8 / quant.linear_fp8, on CPU under
TRITON_INTERPRET=1 (tests/conftest.py), with weights quantized by the quantize pass. The two share a
layout (``qweight [out, in]``, ``scale [out]``) and a launcher, so one set of cases covers both."""

import pytest
import torch

from llmc.runtime import quant
from quant_layouts import activations, kernel_module, quantized_weight, relative_error

# float32: the kernel dots the stored weights and scales each output channel after the K loop; the
# reference scales every weight first. Same math, different rounding order: ~1e-6 of the output.
# bfloat16: the reference rounds each dequantized weight to bfloat16 (2^-9 relative) and the kernel
# does not (int8 and e4m3 values are exact in bfloat16); both round the output, where one
# bfloat16 step is up to 2^-7 (7.8e-3) of the value: about a step apart (seen: 7.4e-3); two allowed.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}
SCHEMES = ["int8", "fp8"]


@pytest.fixture(scope="module", params=SCHEMES)
def scheme(request):
    return request.param


@pytest.fixture(scope="module")
def kernel(scheme, tmp_path_factory):
    return kernel_module(f"linear_{scheme}", tmp_path_factory.mktemp("kernels"))


def reference(scheme):
    return getattr(quant, f"linear_{scheme}")


def case(scheme, tokens, features, outputs, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=gen) * 0.05
    stored = quantized_weight(scheme, weight)
    x = activations(tokens, features, dtype, seed + 1)
    b = (torch.randn(outputs, generator=gen) * 0.1).to(dtype) if bias else None
    return x, stored["qweight"], stored["scale"], b


# (tokens, in, out, bias): in and out never multiples of the tiles (K tails are masked); 1 and 3
# tokens take the decode tile (split-K), 17 and 33 the prefill tile.
SHAPES = [(1, 100, 72, False), (3, 37, 40, True), (17, 200, 130, True), (33, 129, 56, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,features,outputs,bias", SHAPES)
def test_matches_reference(scheme, kernel, dtype, tokens, features, outputs, bias):
    x, qweight, scale, b = case(scheme, tokens, features, outputs, dtype, bias)
    got = getattr(kernel, f"linear_{scheme}")(x, qweight, scale, b)
    want = reference(scheme)(x, qweight, scale, b)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens,config", [(2, (16, 32, 32, 1, 4, 1)), (2, (16, 64, 32, 3, 4, 1)),
                                           (33, (16, 16, 64, 1, 4, 1))],
                         ids=["decode-no-split", "decode-uneven-split", "many-m-tiles"])
def test_explicit_tilings_agree(scheme, kernel, tokens, config):
    """One K split; 5 K tiles (the last partial) over 3 programs; M tiles over 33 tokens."""
    x, qweight, scale, b = case(scheme, tokens, 150, 48, torch.float32, True, seed=3)
    got = kernel.launch(x, qweight, scale, b, config)
    assert relative_error(got, reference(scheme)(x, qweight, scale, b)) < TOLERANCE[torch.float32]


def test_template_parameters_reach_the_launcher(scheme, tmp_path):
    tuned = kernel_module(f"linear_{scheme}", tmp_path, sm_count=4, decode_max_tokens=4,
                          decode_tile=[32, 64, 4, 2], prefill_tile=[32, 32, 32, 4, 2])
    assert tuned.pick_config(4, 64, 100) == (16, 32, 64, 2, 4, 2)  # 2 N tiles, split 2 fills 4 SMs
    assert tuned.pick_config(5, 64, 100) == (32, 32, 32, 1, 4, 2)
    x, qweight, scale, _ = case(scheme, 5, 70, 20, torch.float32, False)
    got = getattr(tuned, f"linear_{scheme}")(x, qweight, scale)
    assert relative_error(got, reference(scheme)(x, qweight, scale)) < 2e-5


def test_shape_mismatch_is_an_error(scheme, kernel):
    x, qweight, scale, _ = case(scheme, 1, 64, 8, torch.float32, False)
    with pytest.raises(ValueError, match=f"{scheme} layout"):
        getattr(kernel, f"linear_{scheme}")(x[:, :32], qweight, scale)
