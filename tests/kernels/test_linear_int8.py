"""The W8A16 Triton kernel (codegen/templates/triton/linear_int8.py.jinja) vs quant.linear_int8, on CPU
under TRITON_INTERPRET=1 (tests/conftest.py), with weights quantized by the quantize pass."""

import pytest
import torch

from llmc.runtime import quant
from quant_layouts import activations, kernel_module, quantized_weight, relative_error

# float32: the kernel dots the integer weights and scales each output channel after the K loop; the
# reference scales every weight first. Same math, different rounding order: ~1e-6 of the output.
# bfloat16: the reference rounds each dequantized weight to bfloat16 (2^-9 relative) and the kernel
# does not (int8 values are exact in bfloat16); both round the output, where one
# bfloat16 step is up to 2^-7 (7.8e-3) of the value: about a step apart (seen: 7.4e-3); two allowed.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return kernel_module("linear_int8", tmp_path_factory.mktemp("kernels"))


def int8_case(tokens, features, outputs, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=gen) * 0.05
    stored = quantized_weight("int8", weight)
    x = activations(tokens, features, dtype, seed + 1)
    b = (torch.randn(outputs, generator=gen) * 0.1).to(dtype) if bias else None
    return x, stored["qweight"], stored["scale"], b


# (tokens, in, out, bias): in and out never multiples of the tiles (K tails are masked); 1 and 3
# tokens take the decode tile (split-K), 17 and 33 the prefill tile.
SHAPES = [(1, 100, 72, False), (3, 37, 40, True), (17, 200, 130, True), (33, 129, 56, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,features,outputs,bias", SHAPES)
def test_matches_reference(kernel, dtype, tokens, features, outputs, bias):
    x, qweight, scale, b = int8_case(tokens, features, outputs, dtype, bias)
    got = kernel.linear_int8(x, qweight, scale, b)
    want = quant.linear_int8(x, qweight, scale, b)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens,config", [(2, (16, 32, 32, 1, 4, 1)), (2, (16, 64, 32, 3, 4, 1)),
                                           (33, (16, 16, 64, 1, 4, 1))],
                         ids=["decode-no-split", "decode-uneven-split", "many-m-tiles"])
def test_explicit_tilings_agree(kernel, tokens, config):
    """One K split; 5 K tiles (the last partial) over 3 programs; M tiles over 33 tokens."""
    x, qweight, scale, b = int8_case(tokens, 150, 48, torch.float32, True, seed=3)
    got = kernel.launch(x, qweight, scale, b, config)
    assert relative_error(got, quant.linear_int8(x, qweight, scale, b)) < TOLERANCE[torch.float32]


def test_template_parameters_reach_the_launcher(tmp_path):
    tuned = kernel_module("linear_int8", tmp_path, sm_count=4, decode_max_tokens=4,
                          decode_tile=[32, 64, 4, 2], prefill_tile=[32, 32, 32, 4, 2])
    assert tuned.pick_config(4, 64, 100) == (16, 32, 64, 2, 4, 2)  # 2 N tiles, split 2 fills 4 SMs
    assert tuned.pick_config(5, 64, 100) == (32, 32, 32, 1, 4, 2)
    x, qweight, scale, _ = int8_case(5, 70, 20, torch.float32, False)
    assert relative_error(tuned.linear_int8(x, qweight, scale), quant.linear_int8(x, qweight, scale)) < 2e-5


def test_shape_mismatch_is_an_error(kernel):
    x, qweight, scale, _ = int8_case(1, 64, 8, torch.float32, False)
    with pytest.raises(ValueError, match="int8 layout"):
        kernel.linear_int8(x[:, :32], qweight, scale)
