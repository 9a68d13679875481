"""Model quality on held-out text: perplexity, a unigram baseline, and agreement with a reference.

The model directory (or package) names its data in ``split.json``: relative paths of the files it
was trained on and of the held-out files, under a data root (the CPython stdlib for the example
model, ``examples/train_tiny.py``). Held-out files are tokenized in the order listed, each as
``<bos> text <eos>`` like the training stream, and the first ``tokens`` targets are scored with a
sliding window: windows of ``context`` tokens advance by ``stride``, so every scored token but
those of the first window sees at least ``context - stride`` tokens of context.

Numbers reported:

- perplexity = exp(mean negative log-likelihood of the scored tokens);
- the unigram perplexity over the same tokenizer: token frequencies counted on the TRAIN files
  with add-one smoothing, scored on the same held-out tokens (a model that learned nothing beyond
  token frequencies gets this);
- with a reference model: KL(reference || evaluated) of the next-token distributions, top-1
  agreement, and the max / mean absolute logit difference, over the same positions.

Models are plain callables ``ids -> logits [len(ids), vocab]``, so this module imports no llmc: it
is copied into every package (``python PKG eval``) and ``llmc eval`` calls the same code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

SPLIT_FILE = "split.json"
DEFAULT_TOKENS = 65536
DEFAULT_CONTEXT = 512
LogitsFn = Callable[[Sequence[int]], torch.Tensor]


class EvalError(Exception):
    """A missing split, tokenizer or data file, or models that cannot be compared (one-line CLI error)."""


@dataclass
class HeldOut:
    """The held-out token stream and where it came from."""

    ids: list[int]
    files: list[str]
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # sha256 differs from the one split.json recorded


# ---- data ----------------------------------------------------------------------------------------

def load_split(model_dir: str | Path) -> dict:
    path = Path(model_dir) / SPLIT_FILE
    if not path.is_file():
        raise EvalError(f"{path} not found: evaluation needs the list of train and held-out files the model "
                        "was trained on (examples/train_tiny.py writes it next to the model)")
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON ({exc})") from None
    for key in ("train", "heldout"):
        if not isinstance(split.get(key), list) or not split[key]:
            raise EvalError(f"{path}: needs a non-empty list {key!r} of file paths relative to the data root")
    return split


def default_data_root() -> Path:
    """Where the example model's files live: this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EvalError(f"{path} not found: evaluation needs the model's tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise EvalError(f"{path}: cannot read tokenizer: {exc}") from None


def boundary_ids(tokenizer_dir: str | Path, tokenizer) -> tuple[int | None, int | None]:
    """(bos, eos) ids from tokenizer_config.json, as the training stream framed each file."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def token_id(key: str) -> int | None:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return tokenizer.token_to_id(text) if isinstance(text, str) else None

    return token_id("bos_token"), token_id("eos_token")


def read_texts(names: Sequence[str], root: Path) -> tuple[dict[str, str], list[str]]:
    """(relative path -> text, missing paths). Bytes are decoded as UTF-8 (the split holds only such files)."""
    texts, missing = {}, []
    for name in names:
        path = root / name
        if path.is_file():
            texts[name] = path.read_bytes().decode("utf-8", errors="replace")
        else:
            missing.append(name)
    return texts, missing


def encode_files(tokenizer, texts: Sequence[str], bos: int | None, eos: int | None) -> list[list[int]]:
    framed = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        framed.append(([bos] if bos is not None else []) + enc.ids + ([eos] if eos is not None else []))
    return framed


def heldout_stream(tokenizer, split: dict, root: Path, n_tokens: int, bos: int | None,
                   eos: int | None) -> HeldOut:
    """The first ``n_tokens + 1`` tokens of the held-out files in split order (n_tokens targets)."""
    texts, missing = read_texts(split["heldout"], root)
    if not texts:
        raise EvalError(f"none of the {len(split['heldout'])} held-out files of {SPLIT_FILE} is under {root}; "
                        "point --data-dir at the data the model was trained on")
    recorded = split.get("heldout_sha256", {})
    ids: list[int] = []
    used, changed = [], []
    for name, text in texts.items():
        if len(ids) > n_tokens:
            break
        used.append(name)
        if name in recorded and hashlib.sha256(text.encode("utf-8")).hexdigest() != recorded[name]:
            changed.append(name)
        ids.extend(encode_files(tokenizer, [text], bos, eos)[0])
    if len(ids) < 2:
        raise EvalError(f"the held-out files under {root} hold fewer than 2 tokens; nothing to score")
    return HeldOut(ids[:n_tokens + 1], used, missing, changed)


def unigram_log_probs(tokenizer, split: dict, root: Path, bos: int | None, eos: int | None) -> torch.Tensor:
    """log p(token) from the train files' token counts with add-one smoothing, over the whole vocab."""
    texts, _ = read_texts(split["train"], root)
    if not texts:
        raise EvalError(f"none of the {len(split['train'])} train files of {SPLIT_FILE} is under {root}; "
                        "point --data-dir at the data the model was trained on")
    counts = torch.ones(tokenizer.get_vocab_size(with_added_tokens=True), dtype=torch.float64)  # add-one
    for ids in encode_files(tokenizer, list(texts.values()), bos, eos):
        counts += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=len(counts)).double()
    return (counts / counts.sum()).log()


# ---- scoring -------------------------------------------------------------------------------------

def windows(n_ids: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first target) of each window over ``n_ids`` tokens; targets 1..n_ids-1 once each.

    A window feeds ids[start:end]; its logits row j predicts ids[start + j + 1]; it scores the
    targets first..end-1 that earlier windows did not.
    """
    if not 0 < stride <= context - 1:
        raise EvalError(f"stride must be between 1 and context - 1 = {context - 1}, got {stride}")
    spans, start, first = [], 0, 1
    while first < n_ids:
        end = min(start + context, n_ids)
        spans.append((start, end, first))
        first = end
        start = end - (context - stride)
    return spans


def _window_logits(fn: LogitsFn, ids: Sequence[int], name: str) -> torch.Tensor:
    logits = fn(list(ids))
    if logits.dim() != 2 or logits.shape[0] != len(ids):
        raise EvalError(f"{name} returned logits of shape {tuple(logits.shape)} for {len(ids)} tokens; "
                        f"expected [{len(ids)}, vocab]")
    return logits.detach().to("cpu", torch.float64)


def score(model: LogitsFn, ids: Sequence[int], context: int, stride: int, reference: LogitsFn | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Sums over the scored targets: nll (and, with a reference, its nll, KL, agreement, logit errors)."""
    n_targets = len(ids) - 1
    sums = {"targets": 0, "nll": 0.0}
    if reference is not None:
        sums.update(reference_nll=0.0, kl=0.0, top1_agree=0, abs_logit_error_sum=0.0,
                    logit_elements=0, max_abs_logit_error=0.0)
    for start, end, first in windows(len(ids), context, stride):
        rows = slice(first - 1 - start, end - 1 - start)
        targets = torch.tensor(ids[first:end], dtype=torch.int64)
        logits = _window_logits(model, ids[start:end], "the model")[rows]
        logp = logits.log_softmax(-1)
        sums["nll"] -= logp.gather(1, targets[:, None]).sum().item()
        sums["targets"] += len(targets)
        if reference is not None:
            ref_logits = _window_logits(reference, ids[start:end], "the reference")[rows]
            if ref_logits.shape != logits.shape:
                raise EvalError(f"the reference's vocabulary ({ref_logits.shape[1]}) differs from the "
                                f"model's ({logits.shape[1]}); compare models that share a tokenizer")
            ref_logp = ref_logits.log_softmax(-1)
            sums["reference_nll"] -= ref_logp.gather(1, targets[:, None]).sum().item()
            sums["kl"] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            sums["top1_agree"] += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            error = (logits - ref_logits).abs()
            sums["abs_logit_error_sum"] += error.sum().item()
            sums["logit_elements"] += error.numel()
            sums["max_abs_logit_error"] = max(sums["max_abs_logit_error"], error.max().item())
        if on_progress is not None:
            on_progress(sums["targets"], n_targets)
    return sums


def evaluate(model: LogitsFn, model_dir: str | Path, *, reference: LogitsFn | None = None,
             tokens: int = DEFAULT_TOKENS, context: int = DEFAULT_CONTEXT, stride: int | None = None,
             data_root: str | Path | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate ``model`` on the held-out files named by ``model_dir``'s split.json; a JSON-able dict."""
    if tokens < 1:
        raise EvalError(f"--tokens must be at least 1, got {tokens}")
    started = time.perf_counter()
    stride = stride if stride is not None else context // 2
    root = Path(data_root) if data_root is not None else default_data_root()
    split = load_split(model_dir)
    tokenizer = load_tokenizer(model_dir)
    bos, eos = boundary_ids(model_dir, tokenizer)
    heldout = heldout_stream(tokenizer, split, root, tokens, bos, eos)
    unigram = unigram_log_probs(tokenizer, split, root, bos, eos)
    sums = score(model, heldout.ids, context, stride, reference, on_progress)
    n = sums["targets"]
    unigram_nll = -unigram[torch.tensor(heldout.ids[1:], dtype=torch.int64)].sum().item() / n
    result = {
        "tokens": n, "context": context, "stride": stride, "data_root": str(root),
        "heldout_files_used": len(heldout.files), "heldout_files_missing": heldout.missing,
        "heldout_files_changed": heldout.changed,
        "nll": sums["nll"] / n, "perplexity": math.exp(sums["nll"] / n),
        "unigram_nll": unigram_nll, "unigram_perplexity": math.exp(unigram_nll),
    }
    result["unigram_over_model_perplexity"] = result["unigram_perplexity"] / result["perplexity"]
    if reference is not None:
        result.update(
            reference_perplexity=math.exp(sums["reference_nll"] / n), kl_reference_to_model=sums["kl"] / n,
            top1_agreement=sums["top1_agree"] / n, max_abs_logit_error=sums["max_abs_logit_error"],
            mean_abs_logit_error=sums["abs_logit_error_sum"] / sums["logit_elements"])
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def same_tokenizer(dir_a: str | Path, dir_b: str | Path) -> None:
    """Raise unless both directories hold the same tokenizer.json (else token ids mean different text)."""
    a, b = Path(dir_a) / "tokenizer.json", Path(dir_b) / "tokenizer.json"
    for path in (a, b):
        if not path.is_file():
            raise EvalError(f"{path} not found: comparing two models needs both tokenizers")
    if a.read_bytes() != b.read_bytes():
        raise EvalError(f"{a} and {b} differ: a reference must share the model's tokenizer")


# ---- report --------------------------------------------------------------------------------------

ROWS = (  # (result key, label, format)
    ("perplexity", "perplexity", "{:.3f}"),
    ("unigram_perplexity", "unigram perplexity (train counts, add-one)", "{:.3f}"),
    ("unigram_over_model_perplexity", "unigram / model perplexity", "{:.2f}x"),
    ("reference_perplexity", "reference perplexity", "{:.3f}"),
    ("kl_reference_to_model", "KL(reference || model), nats/token", "{:.3g}"),
    ("top1_agreement", "top-1 agreement", "{:.2%}"),
    ("max_abs_logit_error", "max |logit - reference logit|", "{:.3g}"),
    ("mean_abs_logit_error", "mean |logit - reference logit|", "{:.3g}"),
)


def report_rows(result: dict) -> list[tuple[str, str]]:
    """(label, formatted value) for each number in ``result``, in reading order."""
    rows = [(label, fmt.format(result[key])) for key, label, fmt in ROWS if key in result]
    rows.append(("scored tokens", f"{result['tokens']:,} (context {result['context']}, stride {result['stride']}, "
                                  f"{result['heldout_files_used']} held-out files)"))
    rows.append(("time", f"{result['seconds']:.1f} s"))
    return rows


def caveats(result: dict) -> list[str]:
    notes = []
    if result["heldout_files_missing"]:
        notes.append(f"{len(result['heldout_files_missing'])} held-out files are missing under {result['data_root']} "
                     f"(e.g. {result['heldout_files_missing'][0]}); the numbers cover the rest")
    if result["heldout_files_changed"]:
        notes.append(f"{len(result['heldout_files_changed'])} held-out files differ from the ones the model was "
                     "split on (another Python version?); numbers are not comparable with the model's README")
    return notes


def format_report(result: dict) -> str:
    rows = report_rows(result)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines + [f"warning: {note}" for note in caveats(result)])


# ---- command line (``python PKG eval``) -----------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python PKG eval`` (``llmc eval`` declares the same ones with typer)."""
    parser.add_argument("--reference", type=Path, default=None,
                        help="Another package (same tokenizer) to compare next-token distributions with.")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"Held-out tokens to score [{DEFAULT_TOKENS}].")
    parser.add_argument("--context", type=int, default=None, help="Window length [the model's positions, max 512].")
    parser.add_argument("--stride", type=int, default=None, help="Window step [context / 2].")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Root the split's paths are relative to [this Python's stdlib].")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON here.")


def window_length(requested: int | None, max_positions: int | None) -> int:
    if requested is not None:
        if max_positions and requested > max_positions:
            raise EvalError(f"--context {requested} exceeds the model's {max_positions} positions")
        return requested
    return min(DEFAULT_CONTEXT, max_positions or DEFAULT_CONTEXT)


# load(dir) -> (logits function, the model's max positions or None)
Loader = Callable[[Path], tuple[LogitsFn, int | None]]


def run(model_dir: str | Path, load: Loader, *, reference_dir: str | Path | None = None,
        tokens: int = DEFAULT_TOKENS, context: int | None = None, stride: int | None = None,
        data_dir: str | Path | None = None, json_path: str | Path | None = None,
        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Load and evaluate ``model_dir`` (against ``reference_dir``); write JSON if asked; the result."""
    model_dir = Path(model_dir)
    model, max_positions = load(model_dir)
    reference, positions = None, [max_positions]
    if reference_dir is not None:
        same_tokenizer(model_dir, reference_dir)
        reference, ref_positions = load(Path(reference_dir))
        positions.append(ref_positions)
    known = [p for p in positions if p]
    result = evaluate(model, model_dir, reference=reference, tokens=tokens,
                      context=window_length(context, min(known) if known else None), stride=stride,
                      data_root=data_dir, on_progress=on_progress)
    result = {"model": str(model_dir), "reference": None if reference_dir is None else str(reference_dir), **result}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def run_from_args(args: argparse.Namespace, package_dir: str | Path, load: Loader) -> str:
    """``python PKG eval`` after argparse (see add_arguments): the printed report."""
    progress = _stderr_progress if sys.stderr.isatty() else None
    return format_report(run(package_dir, load, reference_dir=args.reference, tokens=args.tokens,
                             context=args.context, stride=args.stride, data_dir=args.data_dir,
                             json_path=args.json, on_progress=progress))


def _stderr_progress(done: int, total: int) -> None:
    print(f"\rscored {done:,}/{total:,} tokens", end="\n" if done >= total else "", file=sys.stderr, flush=True)
