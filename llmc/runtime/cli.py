"""The package's command line: ``python PKG generate ...``, ``python PKG eval`` and ``python PKG info``.

Results go to stdout; errors are one line on stderr (``error: ...``) with exit code 2, like the
llmc CLI. Only argparse and the runtime modules are used, so it runs where llmc is not installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import evaluate
from .engine import Engine, EngineConfig, RequestError
from .package import PackageError, read_plan
from .parallel import load_engine
from .sampler import SamplingError
from .tokenizer import PackageTokenizer, TokenizerError

USER_ERROR_EXIT = 2
USER_ERRORS = (PackageError, RequestError, SamplingError, TokenizerError, evaluate.EvalError)

EPILOG = """examples:
  python PKG generate --prompt "Once upon a time" --max-tokens 32
  python PKG generate --tokens 1,2,3 --max-tokens 8 --temperature 0.8 --top-p 0.9 --seed 0
  python PKG generate --prompt "def main():" --speculative ngram --num-speculative-tokens 4
  python PKG eval --tokens 4096 --json eval.json
  python PKG serve --port 8000     (OpenAI-compatible server; see python PKG serve --help)
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
    gen.add_argument("--kv-cache-bytes", type=_bytes, default=None,
                     help="Memory for the paged KV cache, e.g. 256MiB [the target's default].")
    add_speculative_arguments(gen)
    add_parallel_arguments(gen)
    commands.add_parser("info", help="Print the target, model and passes this package was compiled with.")
    ev = commands.add_parser("eval", help="Perplexity on the held-out files named by split.json, vs a unigram "
                                          "baseline (and KL / top-1 agreement with --reference PKG).")
    evaluate.add_arguments(ev)
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [the target's device].")
    add_serve_parser(commands)
    return parser


SERVE_EPILOG = """examples:
  python PKG serve                                  # http://127.0.0.1:8000/v1
  python PKG serve --host 0.0.0.0 --port 8080 --api-key "$KEY" --max-num-seqs 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "def main", "max_tokens": 16, "temperature": 0}'
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
  (any OpenAI client works: base_url="http://127.0.0.1:8000/v1")

routes: POST /v1/completions, POST /v1/chat/completions (both stream with "stream": true),
GET /v1/models, GET /health (never needs the key), GET /metrics (Prometheus).
SIGTERM or Ctrl-C stops accepting, lets running requests finish (--drain-timeout) and exits 0."""


def add_speculative_arguments(parser) -> None:
    parser.add_argument("--speculative", choices=("off", "ngram", "draft"), default=None,
                        help="Speculative decoding: off, ngram (prompt lookup) or draft (the package's draft "
                             "model); the same tokens as plain decoding, in fewer steps [the package's choice, "
                             "else off].")
    parser.add_argument("--num-speculative-tokens", type=_count(1), default=None,
                        help="Most tokens proposed per sequence and step; fewer are proposed when they are "
                             "rarely accepted or the batch is large [the package's choice, else 4].")
    parser.add_argument("--speculative-saturation-tokens", type=float, default=None, metavar="TOKENS",
                        help="Batched tokens that cost as much as a step's fixed part, the scale of the adaptive "
                             "speculation length (bench/speculative.py measures it) [the target's roofline "
                             "ridge point].")


def speculative_config(args, **fields) -> EngineConfig:
    """An EngineConfig of ``fields`` and the speculative decoding flags in ``args``."""
    return EngineConfig(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                        speculative_saturation_tokens=args.speculative_saturation_tokens, **fields)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _bytes(text: str) -> int:
    """A byte count: 1073741824, 512MiB, 1GiB, 64KiB (also KB/MB/GB, powers of 1000)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, scale in units.items():
        if lowered.endswith(suffix):
            number, factor = lowered[:-len(suffix)], scale
            break
    else:
        number, factor = lowered, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1073741824, 512MiB or 2GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="Serve the model over an OpenAI-compatible HTTP API.", epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics). "
                    "Prints the KV cache size and the URL, then serves until SIGTERM.")
    net = serve.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="Address to bind; 0.0.0.0 exposes the server to the network [127.0.0.1].")
    net.add_argument("--port", type=_count(0), default=8000, help="TCP port [8000].")
    net.add_argument("--api-key", default=None,
                     help="Require 'Authorization: Bearer KEY' on every route but /health [env LLMC_API_KEY].")
    net.add_argument("--served-model-name", default=None,
                     help="The model name clients send and /v1/models lists [the package's name].")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-queue", type=_count(0), default=128,
                        help="Requests allowed to wait beyond the running ones; more get 429 [128].")
    limits.add_argument("--max-request-bytes", type=_bytes, default=2**20,
                        help="Largest request body; larger ones get 413 [1MiB].")
    limits.add_argument("--drain-timeout", type=float, default=30.0,
                        help="Seconds running requests may take to finish after SIGTERM [30].")
    engine = serve.add_argument_group("engine")
    engine.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [the target's device].")
    engine.add_argument("--kv-cache-bytes", type=_bytes, default=None,
                        help="Memory for the paged KV cache, e.g. 2GiB [the target's default].")
    engine.add_argument("--max-num-seqs", type=_count(1), default=None,
                        help="Sequences decoded together in one step [the target's default].")
    engine.add_argument("--max-num-batched-tokens", type=_count(1), default=None,
                        help="Token budget of one step (prefill chunks + decodes) [the target's default].")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="Do not reuse the KV pages of prompt prefixes seen before.")
    add_speculative_arguments(engine)
    add_parallel_arguments(engine)
    engine.add_argument("--threads", type=_count(1), default=None,
                        help="CPU threads torch computes with [torch's default: one per core]. On a "
                             "machine shared with other busy processes, 1 avoids threads waiting on "
                             "each other (decode measured 10-17x faster on a loaded 2-core machine).")


def add_parallel_arguments(parser) -> None:
    parser.add_argument("--tp", type=_count(1), default=None,
                        help="Tensor-parallel ranks; must match the package (compile with --set shard.tp=N). "
                             "Ranks 1.. start as local worker processes [the package's].")
    parser.add_argument("--pp", type=_count(1), default=None,
                        help="Pipeline stages; must match the package (--set shard.pp=N) [the package's].")


def parse_ids(text: str) -> list[int]:
    ids = []
    for piece in text.split(","):
        try:
            ids.append(int(piece.strip()))
        except ValueError:
            raise PackageError(f"--tokens: {piece.strip()!r} is not an integer; write ids separated by "
                               "commas, e.g. --tokens 1,2,3") from None
    return ids


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
    engine = load_engine(package_dir, device=args.device, tp=args.tp, pp=args.pp, config=speculative_config(
        args, kv_cache_bytes=args.kv_cache_bytes))
    new = engine.generate(ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
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
    spec = plan.get("speculative")
    if spec:
        print(f"speculative {spec.get('method')}, up to {spec.get('num_speculative_tokens')} tokens"
              + (f" (draft model in {spec['draft']}/)" if spec.get("draft") else ""))
    print(f"llmc        {plan.get('llmc_version', '?')}")


def package_logits(package_dir: Path, device: str | None):
    """(ids -> logits of every position, longest input) of a package, for evaluate.run."""
    engine = Engine.from_package(package_dir, device=device)
    # prefill keeps room for one generated token, so its longest prompt is one short of the context.
    return engine.prefill, engine.max_model_len - 1


def serve(args, package_dir: Path) -> int:
    """Load the engine and serve it until SIGTERM/SIGINT (``server.py`` holds the HTTP side)."""
    if args.api_key is not None and not args.api_key.strip():
        # Most likely --api-key "$KEY" with KEY unset: serving without a key is not what was asked.
        raise PackageError("--api-key is empty; give the key, or leave the flag out to serve without one")
    try:
        from .server import serve as run_server  # fastapi/uvicorn/prometheus-client: needed only to serve
    except ImportError as exc:
        raise PackageError(f"serving needs fastapi, uvicorn and prometheus-client ({exc}); "
                           "pip install fastapi uvicorn prometheus-client") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = speculative_config(args, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                enable_prefix_caching=not args.no_prefix_caching)
    engine = load_engine(package_dir, device=args.device, config=config, tp=args.tp, pp=args.pp)
    return run_server(engine, host=args.host, port=args.port,
                      api_key=args.api_key or os.environ.get("LLMC_API_KEY") or None,
                      model_name=args.served_model_name, max_queue=args.max_queue,
                      max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout)


def main(argv: list[str] | None = None, package_dir: str | Path | None = None) -> int:
    package_dir = Path(package_dir) if package_dir else Path(__file__).resolve().parent.parent
    args = build_parser(f"python {package_dir.name}").parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun started this process as a rank > 0 of a tp/pp package: it runs the steps rank 0
        # broadcasts (whatever the command), and rank 0 alone serves or generates.
        from .launcher import worker_main

        worker_main()
        return 0
    try:
        if args.command == "generate":
            generate(args, package_dir)
        elif args.command == "serve":
            return serve(args, package_dir)
        elif args.command == "eval":
            print(evaluate.run_from_args(args, package_dir, lambda d: package_logits(d, args.device)))
        else:
            info(package_dir)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
