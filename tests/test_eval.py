"""Model evaluation (llmc/runtime/evaluate.py, `llmc eval`, `python PKG eval`).

The scoring rules are checked on a tiny model over a synthetic corpus built here (exact
perplexities of known distributions, sliding windows, errors); the acceptance checks run the
committed example model on a few hundred held-out tokens: against itself KL is 0, against a
perturbed copy it is not, and its compiled package scores what HF transformers scores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmc.cli import app
from llmc.runtime import evaluate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = REPO / "examples" / "models" / "stdlib-llama-6m"
runner = CliRunner()


def train_tiny_script():
    """examples/train_tiny.py as a module: the fixture below uses its corpus and tokenizer code."""
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "examples" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\x1b\[[0-9;]*m", "", result.output)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, data root): a random 2-layer llama, its BPE tokenizer and split over 12 synthetic files."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    script = train_tiny_script()
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    texts = {}
    for i in range(12):
        body = "".join(f"    x{j} = {i} * {j} + len('{'ab' * (j % 5)}')\n" for j in range(40 + 7 * i))
        texts[f"pkg{i % 3}/mod{i}.py"] = f"def f{i}(n):\n{body}    return n\n"
    for name, text in texts.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text, encoding="utf-8")
    train, heldout = script.split_files(texts, 0.25, seed=0)
    tokenizer = script.train_tokenizer([texts[n] for n in train], vocab=300)
    model_dir = root / "model"
    model_dir.mkdir()
    script.write_split(model_dir / evaluate.SPLIT_FILE, texts, train, heldout, seed=0)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=script.BOS,
                            eos_token=script.EOS).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, data


# ---- scoring rules ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n_ids=st.integers(2, 300), context=st.integers(2, 64), stride_fraction=st.floats(0.01, 1.0))
def test_windows_score_every_target_once_with_enough_context(n_ids, context, stride_fraction):
    stride = max(1, min(context - 1, round(stride_fraction * (context - 1))))
    spans = evaluate.windows(n_ids, context, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n_ids))  # each target once, in order
    for i, (start, end, first) in enumerate(spans):
        assert 0 <= start < first <= end <= n_ids and end - start <= context
        if i > 0:  # later windows give each scored token at least context - stride tokens before it
            assert first - start >= context - stride


def test_stride_must_leave_context():
    with pytest.raises(evaluate.EvalError, match="stride must be between 1 and context - 1 = 7"):
        evaluate.windows(100, 8, 8)


def test_known_distributions_have_their_exact_perplexity(tiny):
    """Uniform logits score exactly vocab; the unigram distribution as logits scores the unigram baseline."""
    model_dir, data = tiny
    tokenizer = evaluate.load_tokenizer(model_dir)
    vocab = tokenizer.get_vocab_size()
    uniform = evaluate.evaluate(lambda ids: torch.zeros(len(ids), vocab), model_dir, tokens=200, context=32,
                                data_root=data)
    assert uniform["tokens"] == 200
    assert uniform["perplexity"] == pytest.approx(vocab, rel=1e-9)
    bos, eos = evaluate.boundary_ids(model_dir, tokenizer)
    unigram = evaluate.unigram_log_probs(tokenizer, evaluate.load_split(model_dir), data, bos, eos)
    as_model = evaluate.evaluate(lambda ids: unigram.expand(len(ids), -1), model_dir, tokens=200, context=32,
                                 data_root=data)
    assert as_model["perplexity"] == pytest.approx(as_model["unigram_perplexity"], rel=1e-9)
    assert as_model["unigram_perplexity"] < vocab  # the counts carry information


def test_heldout_stream_follows_the_split_and_frames_each_file(tiny):
    model_dir, data = tiny
    split = evaluate.load_split(model_dir)
    tokenizer = evaluate.load_tokenizer(model_dir)
    bos, eos = evaluate.boundary_ids(model_dir, tokenizer)
    stream = evaluate.heldout_stream(tokenizer, split, data, 10**6, bos, eos)
    expected = []
    for name in split["heldout"]:
        expected += [bos] + tokenizer.encode((data / name).read_text(), add_special_tokens=False).ids + [eos]
    assert stream.files == split["heldout"] and stream.ids == expected
    assert not stream.missing and not stream.changed


def test_reference_metrics_see_a_changed_distribution(tiny):
    model_dir, data = tiny
    vocab = evaluate.load_tokenizer(model_dir).get_vocab_size()
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0))

    def model(ids):
        return logits[:len(ids)]

    def shifted(ids):
        return logits[:len(ids)] + 3.0  # same softmax, different logits

    same = evaluate.evaluate(model, model_dir, reference=shifted, tokens=100, context=32, data_root=data)
    assert same["kl_reference_to_model"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    assert same["max_abs_logit_error"] == pytest.approx(3.0) == same["mean_abs_logit_error"]
    flipped = evaluate.evaluate(model, model_dir, reference=lambda ids: -model(ids), tokens=100, context=32,
                                data_root=data)
    assert flipped["kl_reference_to_model"] > 1.0 and flipped["top1_agreement"] == 0.0


# ---- llmc eval: output and errors ----------------------------------------------------------------------

def test_llmc_eval_prints_a_table_and_writes_json(tiny, tmp_path):
    model_dir, data = tiny
    code, output = invoke("eval", model_dir, "--data-dir", data, "--tokens", 100, "--json", tmp_path / "e.json")
    assert code == 0, output
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["tokens"] == 100 and result["reference"] is None and result["context"] == 64
    assert re.search(rf"perplexity\s+│\s+{result['perplexity']:.3f}", output)
    assert re.search(rf"unigram perplexity.*│\s+{result['unigram_perplexity']:.3f}", output)
    assert "KL" not in output  # no reference, no comparison rows


@pytest.mark.parametrize("case, message", [
    ("no split", "split.json not found"),
    ("no data", "none of the 3 held-out files"),
    ("other tokenizer", "a reference must share the model's tokenizer"),
    ("context too long", "--context 65 exceeds the model's 64 positions"),
    ("not a model", "does not exist or is not a directory"),
])
def test_llmc_eval_user_errors_are_one_line(tiny, tmp_path, case, message):
    model_dir, data = tiny
    args = [model_dir, "--data-dir", data, "--tokens", 50]
    if case == "no split":
        bare = tmp_path / "bare"
        shutil.copytree(model_dir, bare)
        (bare / evaluate.SPLIT_FILE).unlink()
        args[0] = bare
    elif case == "no data":
        args[2] = tmp_path
    elif case == "other tokenizer":
        other = tmp_path / "other"
        shutil.copytree(model_dir, other)
        config = json.loads((other / "tokenizer.json").read_text())
        config["model"]["vocab"]["<s>"], config["model"]["vocab"]["</s>"] = 1, 0
        (other / "tokenizer.json").write_text(json.dumps(config))
        args += ["--reference", other]
    elif case == "context too long":
        args += ["--context", 65]
    else:
        args[0] = tmp_path / "missing"
    code, output = invoke("eval", *args)
    assert code == 2, output
    assert output.startswith("error: ") and message in output, output


# ---- the committed example model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def heldout_available():
    split = evaluate.load_split(EXAMPLE_MODEL)
    if not (evaluate.default_data_root() / split["heldout"][0]).is_file():
        pytest.skip(f"this Python's stdlib lacks the example model's held-out files (made on {split['python']})")


def eval_json(tmp_path: Path, name: str, *args) -> dict:
    path = tmp_path / f"{name}.json"
    code, output = invoke("eval", *args, "--json", path)
    assert code == 0, output
    return json.loads(path.read_text())


def test_example_model_against_itself_has_zero_kl(heldout_available, tmp_path):
    result = eval_json(tmp_path, "self", EXAMPLE_MODEL, "--reference", EXAMPLE_MODEL, "--tokens", 300)
    assert result["tokens"] == 300
    assert result["kl_reference_to_model"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["max_abs_logit_error"] == 0.0
    assert result["reference_perplexity"] == result["perplexity"]


def test_example_model_against_a_perturbed_copy_has_positive_kl(heldout_available, tmp_path):
    perturbed = tmp_path / "perturbed"
    shutil.copytree(EXAMPLE_MODEL, perturbed)
    weights = load_file(perturbed / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    noise = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    weights[name] = (weights[name].float() + 0.05 * noise).to(weights[name].dtype)
    save_file(weights, perturbed / "model.safetensors", metadata={"format": "pt"})
    result = eval_json(tmp_path, "perturbed", perturbed, "--reference", EXAMPLE_MODEL, "--tokens", 300)
    assert result["kl_reference_to_model"] > 1e-4
    assert result["max_abs_logit_error"] > 0.01
    assert result["reference_perplexity"] != result["perplexity"]


@pytest.fixture(scope="module")
def example_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example") / "stdlib-cpu"
    code, output = invoke("compile", EXAMPLE_MODEL, "--target", "cpu", "-o", out)
    assert code == 0, output
    return out


@pytest.mark.slow  # compiles the model (about 15 s)
def test_package_eval_matches_the_hf_model(heldout_available, example_package, tmp_path):
    assert (example_package / evaluate.SPLIT_FILE).read_bytes() == (EXAMPLE_MODEL / evaluate.SPLIT_FILE).read_bytes()
    done = subprocess.run([sys.executable, str(example_package), "eval", "--tokens", "300",
                           "--json", str(tmp_path / "pkg.json")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^perplexity\s+\d+\.\d{3}$", done.stdout, re.MULTILINE), done.stdout
    package = json.loads((tmp_path / "pkg.json").read_text())
    hf = eval_json(tmp_path, "hf", EXAMPLE_MODEL, "--tokens", 300)
    assert package["tokens"] == hf["tokens"] == 300
    assert package["unigram_perplexity"] == hf["unigram_perplexity"]
    assert package["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-4)
    # Token by token: the package's next-token distributions are HF's up to float32 rounding.
    compared = eval_json(tmp_path, "vs", example_package, "--reference", EXAMPLE_MODEL, "--tokens", 300)
    assert compared["kl_reference_to_model"] < 1e-6 and compared["top1_agreement"] >= 0.99
    assert compared["max_abs_logit_error"] < 1e-2
    assert math.isclose(compared["reference_perplexity"], hf["perplexity"], rel_tol=1e-12)
