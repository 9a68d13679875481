"""Time each way the CPU torch backend could run a quantized linear, against float32 F.linear.

    python bench/quant_linear.py [--n 4096] [--k 4096] [--batch 1 16]

For every scheme of the quantize pass this times the reference math (dequantize each call, then
F.linear: what a backend without kernels does) and the ATen weight-only kernels, and prints the
median time, the ratio to float32 and the achieved weight-read bandwidth. The torch backend uses
the fastest per scheme on device cpu (codegen/torch_backend.py CPU_EMITTERS); results go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from llmc.runtime import quant


def median_ms(fn, repeat: int = 15) -> float:
    fn(), fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="output features")
    parser.add_argument("--k", type=int, default=4096, help="input features")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="tokens per call")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, k = args.n, args.k
    w = torch.randn(n, k) * 0.02
    scale8 = w.abs().amax(1) / 127
    q8 = torch.round(w / scale8[:, None]).to(torch.int8)
    g = 128
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s4 = (hi - lo) / 15
    z4 = torch.round(-lo / s4).clamp(0, 15)
    q4 = torch.round(wg / s4[..., None] + z4[..., None]).clamp(0, 15).reshape(n, k).to(torch.uint8)
    p4, z4 = quant.pack_int4(q4), z4.to(torch.uint8)
    packed, sz = quant.prepare_int4_cpu(p4, s4, z4, g)
    f8scale = w.abs().amax(1) / 448
    f8 = (w / f8scale[:, None]).to(torch.float8_e4m3fn)
    dense8 = quant.dequantize_fp8(f8, f8scale)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"weight {n}x{k}")
    print("| tokens | implementation | weight bytes | ms (median) | vs float32 | GB/s of weight read |")
    print("|---|---|---|---|---|---|")
    for m in args.batch:
        x = torch.randn(m, k)
        cases = [
            ("float32 F.linear", n * k * 4, lambda: F.linear(x, w)),
            ("int8: dequantize + F.linear (reference)", n * k, lambda: quant.linear_int8(x, q8, scale8)),
            ("int8: aten._weight_int8pack_mm, bf16 x (used)", n * k, lambda: quant.linear_int8_cpu(x, q8, scale8)),
            ("int4 g128: dequantize + F.linear (reference)", n * k // 2,
             lambda: quant.linear_int4(x, p4, s4, z4, group_size=g)),
            ("int4 g128: aten._weight_int4pack_mm_for_cpu, bf16 x (used)", n * k // 2,
             lambda: quant.linear_int4_cpu(x, packed, sz, group_size=g)),
            ("fp8: dequantize + F.linear (reference)", n * k, lambda: quant.linear_fp8(x, f8, f8scale)),
            ("fp8: expanded to float32 at load (used)", n * k * 4, lambda: F.linear(x, dense8)),
            ("w8a8: int32 matmul (reference)", n * k, lambda: quant.linear_w8a8(x, q8, scale8, torch.ones(k))),
            ("w8a8: int8 activations through _weight_int8pack_mm (used)", n * k,
             lambda: quant.linear_w8a8_cpu(x, q8, scale8, torch.ones(k))),
        ]
        base = None
        for label, nbytes, fn in cases:
            ms = median_ms(fn)
            base = base or ms
            print(f"| {m} | {label} | {nbytes / 2**20:.0f} MiB | {ms:.2f} | {base / ms:.2f}x | {nbytes / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
