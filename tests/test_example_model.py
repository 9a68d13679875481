"""The committed example model (examples/models/stdlib-llama-6m): what it is, that it learned
something (3x better than a unigram model on held-out files), that its README and split agree with
the training script, and that the README's quick start really runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from llmc.runtime import evaluate
from llmc.runtime.tokenizer import PackageTokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "models" / "stdlib-llama-6m"
MAX_COMMITTED_BYTES = 25 * 2**20


def load_json(name: str) -> dict:
    return json.loads((MODEL / name).read_text(encoding="utf-8"))


def train_tiny_script():
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "examples" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_stdlib_as_training() -> bool:
    return load_json("split.json")["python"] == sys.version.split()[0]


def test_committed_files_are_a_small_bf16_checkpoint():
    names = {p.name for p in MODEL.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "split.json", "loss_curve.csv", "training.json", "README.md"):
        assert required in names, f"{MODEL} lacks {required}"
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < MAX_COMMITTED_BYTES
    with safe_open(MODEL / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
    assert dtypes == {"BF16"}  # half the bytes of float32; llmc and llmc eval up-cast to float32


def test_config_is_a_small_gqa_llama_with_512_positions():
    config = load_json("config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert 4 <= config["num_hidden_layers"] <= 6
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["max_position_embeddings"] == 512
    with safe_open(MODEL / "model.safetensors", "pt") as weights:
        n_params = sum(torch.Size(weights.get_slice(k).get_shape()).numel() for k in weights.keys())
    assert 6_000_000 <= n_params <= 12_000_000
    assert n_params == load_json("training.json")["parameters"]


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_byte_level_tokenizer_round_trips_any_text(text):
    tokenizer = PackageTokenizer.from_dir(MODEL)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.tokenizer.token_to_id(tokenizer.special_token("bos_token"))  # like every training file
    assert tokenizer.decode(ids) == text


def test_chat_template_and_stop_token_agree_with_transformers():
    from transformers import AutoTokenizer

    ours = PackageTokenizer.from_dir(MODEL)
    theirs = AutoTokenizer.from_pretrained(MODEL)
    messages = [{"role": "user", "content": "Write a function that reverses a list."}]
    rendered = ours.apply_chat_template(messages)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("# assistant:\n")
    assert load_json("generation_config.json")["eos_token_id"] == ours.eos_token_id == theirs.eos_token_id


def test_split_is_by_file_and_is_what_the_script_makes():
    split = load_json("split.json")
    train, heldout = set(split["train"]), set(split["heldout"])
    assert not train & heldout and len(heldout) == len(split["heldout"])
    assert 0.05 <= len(heldout) / (len(train) + len(heldout)) <= 0.2
    assert not any({"test", "tests", "site-packages"} & set(Path(n).parts) for n in train | heldout)
    if not same_stdlib_as_training():
        pytest.skip(f"the split was made from Python {split['python']}'s stdlib")
    script = train_tiny_script()
    texts = script.stdlib_files(evaluate.default_data_root())
    assert script.split_files(texts, script.parse_args([]).heldout_fraction, split["seed"]) == \
        (split["train"], split["heldout"])


def test_loss_curve_covers_every_step_and_falls():
    with (MODEL / "loss_curve.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    training = load_json("training.json")
    assert [int(r["step"]) for r in rows] == list(range(1, training["hyperparameters"]["steps"] + 1))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-25:]) / 25 == pytest.approx(training["final_train_loss_mean_last_25"])
    assert sum(losses[-25:]) / 25 < sum(losses[:25]) / 25 - 2


def test_model_is_three_times_better_than_unigram_on_heldout_files():
    """The acceptance bar, recomputed on 1024 held-out tokens with HF transformers in float32."""
    from transformers import AutoModelForCausalLM

    split = load_json("split.json")
    if not (evaluate.default_data_root() / split["heldout"][0]).is_file():
        pytest.skip(f"this Python's stdlib lacks the held-out files (the split was made on {split['python']})")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logits(ids):
        return model(input_ids=torch.tensor([ids])).logits[0]

    result = evaluate.evaluate(logits, MODEL, tokens=1024)
    assert result["tokens"] == 1024 and not result["heldout_files_missing"]
    assert result["unigram_perplexity"] >= 3 * result["perplexity"], result


def test_model_readme_reports_the_recorded_evaluation_and_training():
    """The README's numbers are the ones in eval.json (written by `llmc eval --json`) and training.json."""
    readme = (MODEL / "README.md").read_text(encoding="utf-8")
    recorded = load_json("eval.json")
    training = load_json("training.json")
    assert recorded["reference"] is None and recorded["tokens"] == evaluate.DEFAULT_TOKENS
    for number in (f"{recorded['perplexity']:.2f}", f"{recorded['unigram_perplexity']:.2f}",
                   f"{training['final_train_loss_mean_last_25']:.3f}", f"{training['parameters']:,}",
                   "python examples/train_tiny.py"):
        assert number in readme, f"README.md of the example model does not mention {number}"


@pytest.mark.slow
def test_readme_quick_start_compiles_the_model_and_completes_a_function(tmp_path):
    """Runs the quick start's llmc commands (after the install steps), building into tmp_path."""
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    setup = re.findall(r"```sh\n(.*?)\n```", quick_start, re.DOTALL)[0]
    commands = setup[setup.index("llmc compile"):].replace("build/", f"{tmp_path}/").split(" && ")
    assert len(commands) == 2 and "examples/models/stdlib-llama-6m" in commands[0]
    assert commands[1].endswith("generate --prompt 'def fibonacci(n):' --max-tokens 32")
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert done.stdout.strip(), "the package generated no text"  # the completion of the last command
