"""Calibration data for the passes that need activations (GPTQ, SmoothQuant, Wanda, KV scales).

Sequences come from the checkpoint's own training files when it names them (``split.json``: the
example model's train files under the data root, tokenized like training: ``<bos> text <eos>``),
else from seeded random token ids (a tiny test model has no data; its statistics are still a fair
sample of what its layers see). The graph's ``meta["source"]`` is the checkpoint directory.

``linear_input_stats`` runs the reference interpreter over those sequences and accumulates, for
each chosen ``linear`` node, statistics of its input activations ``X`` [tokens, in]: ``X^T X``
(GPTQ's Hessian, up to a factor 2), the per-channel max ``|x|`` (SmoothQuant), and the per-channel
sum of squares (Wanda's ``||X_j||^2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmc.errors import LlmcError
from llmc.ir import ExecutionContext, Graph, Interpreter


class CalibrationOptions(BaseModel):
    """Where calibration sequences come from and how many (an option block of several passes)."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    source: Literal["auto", "train", "random"] = "auto"   # auto: train files if present, else random
    sequences: int = Field(16, ge=1)
    length: int = Field(128, ge=2)
    seed: int = 0
    data_dir: str | None = None                          # root of split.json's files (default: stdlib)


@dataclass
class CalibrationSet:
    sequences: list[list[int]]
    source: str            # "train files (N)" or "random ids"

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def vocab_size(graph: Graph) -> int:
    for node in graph.nodes:
        if node.op.name == "embedding":
            return graph.type_of(node.inputs[1]).shape[0]
    raise LlmcError("calibration: the graph has no embedding op, so its vocabulary size is unknown")


def _train_sequences(model_dir: Path, options: CalibrationOptions) -> list[list[int]] | None:
    from llmc.runtime import evaluate as ev

    if not (model_dir / ev.SPLIT_FILE).is_file() or not (model_dir / "tokenizer.json").is_file():
        return None
    split = ev.load_split(model_dir)
    tokenizer = ev.load_tokenizer(model_dir)
    bos, eos = ev.boundary_ids(model_dir, tokenizer)
    root = Path(options.data_dir) if options.data_dir else ev.default_data_root()
    # One window from the middle of each of several train files (every k-th file), so calibration
    # sees many modules' code rather than one file or only license headers.
    names = split["train"]
    stride = max(1, len(names) // (options.sequences * 2))
    texts, _ = ev.read_texts(names[::stride], root)
    sequences: list[list[int]] = []
    for framed in ev.encode_files(tokenizer, list(texts.values()), bos, eos):
        if len(framed) >= options.length:
            start = (len(framed) - options.length) // 2
            sequences.append(framed[start:start + options.length])
        if len(sequences) == options.sequences:
            return sequences
    return None


def calibration_set(graph: Graph, options: CalibrationOptions) -> CalibrationSet:
    """``options.sequences`` sequences of ``options.length`` token ids (see the module docstring)."""
    source = graph.meta.get("source")
    if options.source != "random" and source:
        found = _train_sequences(Path(str(source)), options)
        if found is not None:
            return CalibrationSet(found, f"train files ({len(found)})")
    if options.source == "train":
        raise LlmcError(f"calibration source 'train': {source or 'the checkpoint'} names no train files "
                        "(split.json + tokenizer.json) or they are not under the data dir; use source: random "
                        "or set data_dir")
    gen = torch.Generator().manual_seed(options.seed)
    vocab = vocab_size(graph)
    return CalibrationSet([torch.randint(0, vocab, (options.length,), generator=gen).tolist()
                           for _ in range(options.sequences)], "random ids")


@dataclass
class InputStats:
    """Statistics of one linear node's input over all calibration tokens."""
    hessian: torch.Tensor | None = None   # float64 [in, in]: sum of x x^T
    absmax: torch.Tensor | None = None    # float32 [in]
    sqsum: torch.Tensor | None = None     # float64 [in]: sum of x_j^2
    tokens: int = 0

    def add(self, x: torch.Tensor, want: set[str]) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        xd = x.double()
        if "hessian" in want:
            h = xd.t() @ xd
            self.hessian = h if self.hessian is None else self.hessian + h
        if "absmax" in want:
            m = x.float().abs().amax(dim=0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "sqsum" in want:
            s = (xd * xd).sum(dim=0)
            self.sqsum = s if self.sqsum is None else self.sqsum + s
        self.tokens += x.shape[0]


@dataclass
class ActivationStats:
    by_node: dict[str, InputStats] = field(default_factory=dict)  # node ref -> stats of its input 0
    calibration: CalibrationSet | None = None


def linear_input_stats(graph: Graph, calib: CalibrationSet, refs: Iterable[str],
                       want: Iterable[str] = ("hessian", "absmax", "sqsum")) -> ActivationStats:
    """Run ``graph`` on every calibration sequence (a fresh KV cache each) and accumulate the stats
    ``want`` of input 0 of each node in ``refs``."""
    refs = list(refs)
    want = set(want)
    producer_of = {n.ref: n.inputs[0] for n in graph.nodes if n.ref in refs}
    stats = ActivationStats({ref: InputStats() for ref in refs}, calib)
    interp = Interpreter(graph)
    for seq in calib.sequences:
        ids = torch.tensor(seq, dtype=torch.int64)
        env = interp.run({"input_ids": ids, "positions": torch.arange(len(seq))},
                         ExecutionContext.for_graph(graph), keep=True)
        for ref, source in producer_of.items():
            stats.by_node[ref].add(env[source], want)
    return stats
