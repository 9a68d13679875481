"""The bench's results as a table (terminal or markdown for bench/RESULTS.md), JSON, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmc.errors import LlmcError


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def rows(results: dict) -> list[list[str]]:
    """One row per (workload, engine): tokens/s, llmc's ratio over it, latency, roofline, notes."""
    out = []
    decode = results["workloads"].get("decode")
    if decode:
        llmc = decode["engines"].get("llmc", {})
        for name, row in decode["engines"].items():
            ratio = llmc.get("tokens_per_s", math.nan) / row["tokens_per_s"] if name != "llmc" else None
            agree = "" if row.get("agree_with_llmc") is None else f"{row['agree_with_llmc']}/{row['tokens']} tokens agree"
            out.append([f"decode b=1 ({decode['prompt_tokens']}+{decode['new_tokens']})", name,
                        _fmt(row["tokens_per_s"]), _fmt(ratio, ".2f", "x"), _fmt(row["ttft_s"] * 1e3, ".0f"),
                        _fmt(row["tpot_s"] * 1e3, ".1f"), _fmt(row.get("roofline"), ".0%"), agree])
    offline = results["workloads"].get("offline")
    if offline:
        llmc = offline["engines"].get("llmc", {})
        label = f"offline {offline['requests']} req"
        for name, row in offline["engines"].items():
            ratio = llmc.get("tokens_per_s", math.nan) / row["tokens_per_s"] if name != "llmc" else None
            note = (f"{row['steps']} steps" if "steps" in row else f"{row['wasted_tokens']} padded tokens"
                    if "wasted_tokens" in row else row.get("batching", ""))
            out.append([label, name, _fmt(row["tokens_per_s"]), _fmt(ratio, ".2f", "x"), "-", "-", "-", note])
    online = results["workloads"].get("online")
    if online:
        for rate, row in online["engines"]["llmc"].items():
            out.append([f"online {rate} req/s", "llmc", _fmt(row["output_tokens_per_s"]), "-",
                        _fmt(row["ttft_s"]["p50"] * 1e3, ".0f"), _fmt(row["itl_s"]["p50"] * 1e3, ".1f"), "-",
                        f"TTFT p99 {_fmt(row['ttft_s']['p99'] * 1e3, '.0f')} ms, ITL p99 "
                        f"{_fmt(row['itl_s']['p99'] * 1e3, '.0f')} ms, goodput "
                        f"{row['goodput_requests_per_s']:.2f} req/s, {row['failed']} failed"])
    return out


HEADER = ["workload", "engine", "tokens/s", "llmc / engine", "TTFT ms", "ms/token", "roofline", "notes"]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"### {results['date']}: `{results['command']}`", "",
             f"Model {results['model']} (package {Path(results['package']).name}, target {results['target']}); "
             f"{m['cpu']}, {m['cores']} threads; torch {m['torch']}, transformers {m['transformers']}"
             + (f", llama-cpp-python {m['llama_cpp_python']} ({results['gguf_type']} GGUF)"
                if "llama_cpp_python" in m else "")
             + f"; measured copy bandwidth {results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    for name, why in results["skipped"].items():
        lines.append(f"\n- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """Online latency CDFs and throughput vs request rate, when the online workload ran."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlmcError("--plot-dir needs matplotlib (pip install 'llmc[bench]')") from None
    online = results["workloads"].get("online")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if online:
        by_rate = online["engines"]["llmc"]
        rates = sorted(by_rate, key=float)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = [float(r) for r in rates]
        ax.plot(x, [by_rate[r]["output_tokens_per_s"] for r in rates], "o-", label="output tokens/s")
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("output tokens/s")
        goodput = ax.twinx()
        goodput.plot(x, [by_rate[r]["goodput_requests_per_s"] for r in rates], "s--", color="tab:orange")
        goodput.set_ylabel("goodput (requests/s within SLO)", color="tab:orange")
        fig.tight_layout()
        written.append(out_dir / "throughput_vs_rate.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for rate in rates:
            for ax, key in zip(axes, ("ttft_samples_s", "itl_samples_s")):
                values = sorted(by_rate[rate][key])
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{rate} req/s")
        for ax, title in zip(axes, ("time to first token", "inter-token latency")):
            ax.set_xlabel("seconds")
            ax.set_ylabel("fraction")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        written.append(out_dir / "latency_cdf.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
