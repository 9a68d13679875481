"""Train the embedded example model: a small Llama (GQA) on the CPython standard library's source.

    python examples/train_tiny.py --out examples/models/stdlib-llama-6m

Everything is seeded and the budget is a fixed number of optimizer steps (never wall time), so
the same command on the same Python gives the same weights. What it does, in order:

1. Lists the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (no site-packages, no test
   directories) and splits them BY FILE into train and held-out with a seeded shuffle; the split is
   written to ``split.json`` (relative paths, held-out files in shuffled order, their sha256).
2. Trains a byte-level BPE tokenizer (HF ``tokenizers``) on the train files: any text round-trips.
3. Trains ``LlamaForCausalLM`` on random 512-token windows of the train files' token stream
   (each file is ``<s> ... </s>``) with AdamW, linear warm-up then cosine decay, in float32
   (this CPU has no bf16 matmul units, so bf16 autocast would be slower; fp16 on CPU is far slower).
4. Saves the model with ``save_pretrained`` (safetensors, weights stored as bfloat16 to keep the
   committed files small; llmc and ``llmc eval`` up-cast them to float32), the tokenizer with a
   chat template, ``generation_config.json`` and the loss curve (``loss_curve.csv``).

``--stop-after N`` runs only the first N steps of the same schedule and writes nothing but the
loss curve: compare it with the committed ``loss_curve.csv`` to check that training is
deterministic on this machine without spending the full budget.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
BOS, EOS = "<s>", "</s>"
# A plain-text chat format in the model's own language (Python comments): the model was never
# trained on chat, but a package's `generate --chat` needs a template to render.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}# {{ message['role'] }}:\n"
                 "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}# assistant:\n{% endif %}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/models/stdlib-llama-6m"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--vocab", type=int, default=6144)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences of --context tokens per step")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="run only the first N steps of the schedule; write just the loss curve")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


# ---- data ----------------------------------------------------------------------------------------

def stdlib_files(root: Path) -> dict[str, str]:
    """Relative path -> text of every UTF-8 .py file under ``root`` outside EXCLUDED_DIRS."""
    texts = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            texts[rel.as_posix()] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures are deliberately latin-1
            continue
    return texts


def split_files(texts: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle by file: (train paths sorted, held-out paths in shuffled order)."""
    names = sorted(texts)
    random.Random(seed).shuffle(names)
    n_heldout = max(1, round(len(names) * fraction))
    return sorted(names[n_heldout:]), names[:n_heldout]


def write_split(path: Path, texts: dict[str, str], train: list[str], heldout: list[str], seed: int) -> None:
    split = {
        "about": "Files of the CPython stdlib (sysconfig stdlib dir), split by file. Held-out files are "
                 "listed in evaluation order; sha256 tells whether a local stdlib has the same files.",
        "python": sys.version.split()[0],
        "seed": seed,
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "train": train,
        "heldout": heldout,
        "heldout_sha256": {n: hashlib.sha256(texts[n].encode("utf-8")).hexdigest() for n in heldout},
    }
    path.write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # encode(text) starts with <s>, as every training file does: a prompt looks like a file's start.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All files as one int32 stream, each file ``<s> tokens </s>``."""
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ---- model and schedule --------------------------------------------------------------------------

def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS),
        initializer_range=0.02, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def learning_rate(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, stream: torch.Tensor, args) -> list[dict]:
    steps = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    optimizer = make_optimizer(model, args)
    batches = torch.Generator().manual_seed(args.seed + 1)
    window = args.context + 1
    curve = []
    model.train()
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("training", total=steps, loss=float("nan"))
        for step in range(steps):
            offsets = torch.randint(0, len(stream) - window, (args.batch,), generator=batches)
            batch = torch.stack([stream[o:o + window] for o in offsets.tolist()]).long()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            row = {"step": step + 1, "loss": loss.item(), "lr": learning_rate(step, args),
                   "seconds": time.perf_counter() - start}
            curve.append(row)
            bar.update(task, advance=1, loss=row["loss"])
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                bar.console.print(f"step {step + 1:5d}/{steps}  loss {row['loss']:.4f}  "
                                  f"lr {row['lr']:.2e}  {row['seconds']:7.1f} s")
    model.eval()
    return curve


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())


def write_curve(path: Path, curve: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "seconds"])
        for row in curve:  # repr(float): the exact value, so two runs compare bit for bit
            writer.writerow([row["step"], repr(row["loss"]), repr(row["lr"]), f"{row['seconds']:.1f}"])


def print_curve_table(curve: list[dict], every: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training loss (mean over the steps since the previous row)")
    for column in ("step", "loss", "lr", "elapsed"):
        table.add_column(column, justify="right")
    for i in range(0, len(curve), every):
        chunk = curve[i:i + every]
        table.add_row(str(chunk[-1]["step"]), f"{sum(r['loss'] for r in chunk) / len(chunk):.4f}",
                      f"{chunk[-1]['lr']:.2e}", f"{chunk[-1]['seconds']:.0f} s")
    Console().print(table)


def save(model, tokenizer, out: Path, args, curve: list[dict]) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                           model_max_length=args.context)
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     max_length=args.context).save_pretrained(out)
    hyper = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
             if k not in ("out", "stop_after", "log_every")}
    (out / "training.json").write_text(json.dumps({
        "command": "python examples/train_tiny.py " + " ".join(sys.argv[1:]),
        "python": sys.version.split()[0], "torch": torch.__version__, "hyperparameters": hyper,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(curve[-1]["seconds"], 1),
        "final_train_loss_mean_last_25": sum(r["loss"] for r in curve[-25:]) / len(curve[-25:]),
    }, indent=1) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = stdlib_files(root)
    train_names, heldout_names = split_files(texts, args.heldout_fraction, args.seed)
    print(f"{len(texts)} files under {root}: {len(train_names)} train, {len(heldout_names)} held out")
    tokenizer = train_tokenizer([texts[n] for n in train_names], args.vocab)
    stream = token_stream(tokenizer, [texts[n] for n in train_names])
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train stream {len(stream):,} tokens "
          f"({sum(len(texts[n].encode()) for n in train_names) / len(stream):.2f} bytes/token)")
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {args.steps} steps x {args.batch} x {args.context} tokens "
          f"= {args.steps * args.batch * args.context / len(stream):.2f} epochs")
    curve = train(model, stream, args)
    print_curve_table(curve, args.log_every)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stop_after is not None:
        write_curve(args.out / "loss_curve.partial.csv", curve)
        print(f"wrote {args.out / 'loss_curve.partial.csv'} (first {len(curve)} steps only)")
        return 0
    write_curve(args.out / "loss_curve.csv", curve)
    write_split(args.out / "split.json", texts, train_names, heldout_names, args.seed)
    save(model, tokenizer, args.out, args, curve)
    print(f"saved to {args.out} in {curve[-1]['seconds']:.0f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
