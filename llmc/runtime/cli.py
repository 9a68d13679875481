"""The package's command line: ``python PKG generate ...``, ``python PKG eval`` and ``python PKG info``.

Results go to stdout; errors are one line on stderr (``error: ...``) with exit code 2, like the
llmc CLI. Only argparse and the runtime modules are used, so it runs where llmc is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import evaluate
from .engine import Engine, PackageError, read_plan
from .sampler import SamplingError
from .tokenizer import PackageTokenizer, TokenizerError

USER_ERROR_EXIT = 2
USER_ERRORS = (PackageError, SamplingError, TokenizerError, evaluate.EvalError)

EPILOG = """examples:
  python PKG generate --prompt "Once upon a time" --max-tokens 32
  python PKG generate --tokens 1,2,3 --max-tokens 8 --temperature 0.8 --top-p 0.9 --seed 0
  python PKG eval --tokens 4096 --json eval.json
  python PKG info"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Run this llmc-compiled model.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="Generate a continuation of a prompt.",
                              description="Generate from a text prompt (prints text) or from token ids "
                                          "(prints the new ids, comma-separated).")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", help="Prompt text (needs the package's tokenizer.json).")
    source.add_argument("--tokens", "-t", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
    gen.add_argument("--max-tokens", "-n", type=int, default=16, help="New tokens to generate [16].")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0].")
    gen.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely (0 = off) [0].")
    gen.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1 = off) [1].")
    gen.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")
    gen.add_argument("--show-ids", action="store_true", help="With --prompt, also print the new ids.")
    gen.add_argument("--chat", action="store_true", help="Wrap the prompt in the model's chat template.")
    gen.add_argument("--ignore-eos", action="store_true", help="Do not stop at the end-of-sequence token.")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [the target's device].")
    commands.add_parser("info", help="Print the target, model and passes this package was compiled with.")
    ev = commands.add_parser("eval", help="Perplexity on the held-out files named by split.json, vs a unigram "
                                          "baseline (and KL / top-1 agreement with --reference PKG).")
    evaluate.add_arguments(ev)
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [the target's device].")
    return parser


def parse_ids(text: str) -> list[int]:
    ids = []
    for piece in text.split(","):
        try:
            ids.append(int(piece.strip()))
        except ValueError:
            raise PackageError(f"--tokens: {piece.strip()!r} is not an integer; write ids separated by "
                               "commas, e.g. --tokens 1,2,3") from None
    return ids


def stop_ids(package_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (an int or a list), as HF generate uses them."""
    path = package_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def generate(args, package_dir: Path) -> None:
    tokenizer = PackageTokenizer.from_dir(package_dir)
    if args.prompt is not None:
        if tokenizer is None:
            raise PackageError(f"{package_dir} has no tokenizer.json, so --prompt cannot be encoded; "
                               "give token ids instead, e.g. --tokens 1,2,3")
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        ids = tokenizer.encode(text, add_special_tokens=not args.chat)  # templates add their own
    else:
        if args.chat:
            raise PackageError("--chat needs --prompt text")
        ids = parse_ids(args.tokens)
    engine = Engine.from_package(package_dir, device=args.device)
    new = engine.generate(ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed,
                          stop_token_ids=() if args.ignore_eos else stop_ids(package_dir))
    if args.prompt is None:
        print(",".join(str(i) for i in new))
        return
    print(tokenizer.decode(new))
    if args.show_ids:
        print("ids: " + ",".join(str(i) for i in new))


def info(package_dir: Path) -> None:
    plan = read_plan(package_dir)
    target, model = plan.get("target", {}), plan.get("model", {})
    print(f"model       {model.get('architecture', '?')} (vocab {model.get('vocab_size', '?')}, "
          f"{model.get('max_positions', '?')} positions)")
    print(f"target      {target.get('name', '?')} ({target.get('device', '?')}, {target.get('backend', '?')} backend)")
    passes = [p.get("name", "?") for p in plan.get("passes", [])]
    print(f"passes      {', '.join(passes) if passes else '(none)'}")
    print(f"llmc        {plan.get('llmc_version', '?')}")


def package_logits(package_dir: Path, device: str | None):
    """(ids -> logits of every position, max positions) of a package, for evaluate.run."""
    max_positions = read_plan(package_dir).get("model", {}).get("max_positions")
    return Engine.from_package(package_dir, device=device).prefill, max_positions


def main(argv: list[str] | None = None, package_dir: str | Path | None = None) -> int:
    package_dir = Path(package_dir) if package_dir else Path(__file__).resolve().parent.parent
    args = build_parser(f"python {package_dir.name}").parse_args(argv)
    try:
        if args.command == "generate":
            generate(args, package_dir)
        elif args.command == "eval":
            print(evaluate.run_from_args(args, package_dir, lambda d: package_logits(d, args.device)))
        else:
            info(package_dir)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
