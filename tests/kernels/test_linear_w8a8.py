"""The W8A8 Triton kernel (codegen/templates/triton/linear_w8a8.py.jinja) vs quant.linear_w8a8, on CPU
under TRITON_INTERPRET=1 (tests/conftest.py), with SmoothQuant weights from the quantize pass."""

import pytest
import torch

from llmc.runtime import quant
from quant_layouts import activations, kernel_module, quantized_weight, relative_error

# Both sides quantize the activations to the same int8 values (IEEE divisions, ties to even) and
# accumulate exactly in int32, so float32 differs only where split-K sums float32 partials (~1e-7);
# one activation rounded differently would cost ~1e-3 and fail. bfloat16 rounds the output: a
# split-K difference can flip it by one bfloat16 step (up to 2^-7 of the value, 7.8e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return kernel_module("linear_w8a8", tmp_path_factory.mktemp("kernels"))


def w8a8_case(tokens, features, outputs, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=gen) * 0.05
    x = activations(tokens, features, dtype, seed + 1)
    # Calibration absmax from the activations themselves: the smooth factors are far from 1.
    stored = quantized_weight("w8a8", weight, act_absmax=x.float().abs().amax(dim=0))
    b = (torch.randn(outputs, generator=gen) * 0.1).to(dtype) if bias else None
    return x, stored["qweight"], stored["scale"], stored["smooth"], b


# (tokens, in, out, bias): in and out never multiples of the tiles; 1 and 3 tokens take the decode
# tile (split-K), 17 and 33 the prefill tile.
SHAPES = [(1, 100, 72, False), (3, 37, 40, True), (17, 200, 130, True), (33, 129, 56, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,features,outputs,bias", SHAPES)
def test_matches_reference(kernel, dtype, tokens, features, outputs, bias):
    x, qweight, scale, smooth, b = w8a8_case(tokens, features, outputs, dtype, bias)
    assert not torch.allclose(smooth, torch.ones_like(smooth))  # SmoothQuant really divides
    got = kernel.linear_w8a8(x, qweight, scale, smooth, b)
    want = quant.linear_w8a8(x, qweight, scale, smooth, b)
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens,config", [(2, (16, 32, 32, 1, 4, 1)), (2, (16, 64, 32, 3, 4, 1)),
                                           (33, (16, 16, 64, 1, 4, 1))],
                         ids=["decode-no-split", "decode-uneven-split", "many-m-tiles"])
def test_explicit_tilings_agree(kernel, tokens, config):
    """One K split; 5 K tiles (the last partial) over 3 programs; M tiles over 33 tokens."""
    x, qweight, scale, smooth, b = w8a8_case(tokens, 150, 48, torch.float32, True, seed=3)
    got = kernel.launch(x, qweight, scale, smooth, b, config)
    assert relative_error(got, quant.linear_w8a8(x, qweight, scale, smooth, b)) < TOLERANCE[torch.float32]


def test_ties_round_to_even(kernel):
    """max |x| = 127 makes the token scale exactly 1, so x.5 values are ties: torch.round sends
    2.5 -> 2 and -3.5 -> -4; rounding half up would give 3 and -3 and miss the reference by a
    whole weight."""
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 6.5, -7.5] * 5])
    qweight = torch.randint(-127, 128, (24, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale, smooth = torch.full((24,), 0.01), torch.ones(40)
    config = (16, 32, 64, 1, 4, 1)
    got = kernel.launch(x, qweight, scale, smooth, None, config)
    want = quant.linear_w8a8(x, qweight, scale, smooth)
    assert torch.equal(got, want)


def test_template_parameters_reach_the_launcher(tmp_path):
    tuned = kernel_module("linear_w8a8", tmp_path, sm_count=4, decode_max_tokens=4,
                          decode_tile=[32, 64, 4, 2], prefill_tile=[32, 32, 32, 4, 2])
    assert tuned.pick_config(4, 64, 100) == (16, 32, 64, 2, 4, 2)  # 2 N tiles, split 2 fills 4 SMs
    assert tuned.pick_config(5, 64, 100) == (32, 32, 32, 1, 4, 2)
    x, qweight, scale, smooth, _ = w8a8_case(5, 70, 20, torch.float32, False)
    got = tuned.linear_w8a8(x, qweight, scale, smooth)
    assert relative_error(got, quant.linear_w8a8(x, qweight, scale, smooth)) < TOLERANCE[torch.float32]


def test_shape_mismatch_is_an_error(kernel):
    x, qweight, scale, smooth, _ = w8a8_case(1, 64, 8, torch.float32, False)
    with pytest.raises(ValueError, match="w8a8 layout"):
        kernel.linear_w8a8(x, qweight, scale, smooth[:32])
