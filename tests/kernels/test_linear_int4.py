"""The W4A16 Triton kernel (codegen/templates/triton/linear_int4.py.jinja) vs quant.linear_int4, on CPU
under TRITON_INTERPRET=1 (tests/conftest.py), with weights packed by the quantize pass."""

import pytest
import torch

from llmc.runtime import quant
from quant_layouts import activations, kernel_module, quantized_weight, relative_error

# float32: the kernel subtracts the zero, dots, then scales each group's partial sum; the reference
# scales every weight first. Same math, different rounding order: ~1e-6 of the output's scale.
# bfloat16: the reference rounds each dequantized weight to bfloat16 (8-bit mantissa, 2^-9 relative)
# and the kernel does not; both round the output, where one bfloat16 step is up to 2^-7 (7.8e-3) of
# the value: the two differ by about a step (seen: 7.6e-3), the tolerance allows two.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return kernel_module("linear_int4", tmp_path_factory.mktemp("kernels"))


def int4_case(tokens, features, outputs, group, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=gen) * 0.05
    stored = quantized_weight("int4", weight, group_size=group)
    x = activations(tokens, features, dtype, seed + 1)
    b = (torch.randn(outputs, generator=gen) * 0.1).to(dtype) if bias else None
    return x, stored["qweight"], stored["scales"], stored["zeros"], b


# (tokens, in, out, group, bias): out never a multiple of the 64/128 N tiles; 1 and 3 tokens take the
# decode tile (split-K), 17 and 33 the prefill tile; in = 96 and 160 are odd numbers of groups.
SHAPES = [(1, 256, 72, 128, False), (3, 96, 40, 32, True), (17, 192, 130, 64, True),
          (1, 160, 24, 32, True), (33, 128, 56, 64, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,features,outputs,group,bias", SHAPES)
def test_matches_reference(kernel, dtype, tokens, features, outputs, group, bias):
    x, qweight, scales, zeros, b = int4_case(tokens, features, outputs, group, dtype, bias)
    got = kernel.linear_int4(x, qweight, scales, zeros, b, group_size=group)
    want = quant.linear_int4(x, qweight, scales, zeros, b, group_size=group)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens,config", [(2, (16, 32, 32, 1, 4, 1)), (2, (16, 64, 64, 3, 4, 1)),
                                           (33, (16, 16, 32, 1, 4, 1))],
                         ids=["decode-no-split", "decode-uneven-split", "many-m-tiles"])
def test_explicit_tilings_agree(kernel, tokens, config):
    """Each tiling the launcher can pick computes the same product: one K split, a split count not
    dividing the tiles (5 tiles over 3 programs), and M tiles over 33 tokens."""
    x, qweight, scales, zeros, b = int4_case(tokens, 320, 48, 64, torch.float32, True, seed=3)
    got = kernel.launch(x, qweight, scales, zeros, b, 64, config)
    want = quant.linear_int4(x, qweight, scales, zeros, b, group_size=64)
    assert relative_error(got, want) < TOLERANCE[torch.float32]


def test_template_parameters_reach_the_launcher(tmp_path):
    tuned = kernel_module("linear_int4", tmp_path, sm_count=4, decode_max_tokens=4,
                          decode_tile=[32, 64, 4, 2], prefill_tile=[32, 32, 32, 4, 2])
    assert tuned.pick_config(4, 64, 256, 128) == (16, 32, 64, 2, 4, 2)  # 2 N tiles, split 2 fills 4 SMs
    assert tuned.pick_config(5, 64, 256, 32) == (32, 32, 32, 1, 4, 2)
    x, qweight, scales, zeros, _ = int4_case(5, 64, 20, 32, torch.float32, False)
    got = tuned.linear_int4(x, qweight, scales, zeros, group_size=32)
    assert relative_error(got, quant.linear_int4(x, qweight, scales, zeros, group_size=32)) < 2e-5


def test_leading_dims_and_strided_input(kernel):
    x, qweight, scales, zeros, _ = int4_case(6, 64, 20, 32, torch.float32, False)
    x3 = x.reshape(2, 3, 64)
    got = kernel.linear_int4(x3, qweight, scales, zeros, group_size=32)
    assert got.shape == (2, 3, 20)
    wide = torch.cat((x, x), dim=1)[:, ::2]  # stride 2 in the feature dim
    want = quant.linear_int4(wide, qweight, scales, zeros, group_size=32)
    assert relative_error(kernel.linear_int4(wide, qweight, scales, zeros, group_size=32), want) < 2e-5


def test_wrong_group_size_is_an_error(kernel):
    x, qweight, scales, zeros, _ = int4_case(1, 128, 8, 64, torch.float32, False)
    with pytest.raises(ValueError, match="do not match"):
        kernel.linear_int4(x, qweight, scales, zeros, group_size=128)
    with pytest.raises(ValueError, match="power-of-two group_size"):
        kernel.linear_int4(x, qweight, scales, zeros, group_size=96)
