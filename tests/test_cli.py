"""The `llmc` CLI: make-tiny -> inspect -> run on the tiny llama, and user errors as exit code 2."""

import functools
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llmc.frontend.hf
from llmc.cli import app, human_bytes
from llmc.ir import generate_greedy

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    # Strip colour codes in case the environment forces a terminal (FORCE_COLOR).
    result.plain = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    return result


def generated_ids(output: str) -> list[int]:
    match = re.search(r"^generated\s+\[([\d, ]*)\]", output, re.MULTILINE)
    assert match, output
    return [int(x) for x in match.group(1).split(",")]


@pytest.fixture(scope="module", autouse=True)
def import_each_model_once():
    """Each command imports its model; the import is the frontend tests' business and takes
    seconds, so here it runs once per directory (graphs are immutable, so sharing one is safe)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llmc.frontend.hf, "load_hf", functools.lru_cache(llmc.frontend.hf.load_hf))
        yield


def word_tokenizer():
    """A whitespace word-level tokenizer over the tiny vocab: "hello" is 1, "world" is 2."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "hello", "world"] + [f"w{i}" for i in range(3, 128)]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny llama, written by `llmc make-tiny` once for the module, plus a tokenizer.json."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = invoke("make-tiny", out)
    assert result.exit_code == 0, result.plain
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    word_tokenizer().save(str(out / "tokenizer.json"))
    return out


def test_help_teaches_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("inspect", "run", "make-tiny", "llmc make-tiny build/tiny"):
        assert word in result.plain


def test_inspect_summarizes_and_prints_the_ir(tiny):
    result = invoke("inspect", tiny, "--ir")
    assert result.exit_code == 0, result.plain
    text = result.plain
    assert re.search(r"^architecture\s+LlamaForCausalLM$", text, re.MULTILINE)
    assert re.search(r"^model_type\s+llama$", text, re.MULTILINE)
    assert re.search(r"^layers\s+2$", text, re.MULTILINE)
    assert re.search(r"│ attention\s+│\s+2 │", text)  # one attention per layer
    assert re.search(r"^params\s+\d+ tensors, [\d,]+ elements, [\d.]+ KiB$", text, re.MULTILINE)
    assert "rope(" in text and "return logits=" in text


def test_inspect_without_ir_omits_it(tiny):
    result = invoke("inspect", tiny)
    assert result.exit_code == 0, result.plain
    assert "attention" in result.plain and "rope(" not in result.plain


def test_run_generates_what_the_interpreter_generates(tiny):
    result = invoke("run", tiny, "--tokens", "1,2,3", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.plain
    ids = generated_ids(result.plain)
    assert len(ids) == 4
    expected, _ = generate_greedy(llmc.frontend.hf.load_hf(tiny).graph, [1, 2, 3], 4)
    assert ids == expected
    assert re.search(r"^prefill\s+3 tokens in [\d.]+ ms$", result.plain, re.MULTILINE)
    assert re.search(r"^decode\s+3 steps, [\d.]+ ms/step", result.plain, re.MULTILINE)


def test_run_encodes_and_decodes_with_the_model_tokenizer(tiny):
    result = invoke("run", tiny, "--prompt", "hello world", "-n", "3")
    assert result.exit_code == 0, result.plain
    assert re.search(r"^prompt ids\s+\[1, 2\]", result.plain, re.MULTILINE)
    ids = generated_ids(result.plain)
    assert f"output text  {word_tokenizer().decode(ids)!r}" in result.plain


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.plain
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    assert "Traceback" not in result.plain
    assert "error:" in result.plain
    for fragment in fragments:
        assert fragment in result.plain


def test_run_on_a_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_user_error(invoke("run", missing), str(missing), "does not exist")


def test_run_rejects_token_ids_outside_the_vocabulary(tiny):
    assert_user_error(invoke("run", tiny, "--tokens", "999"), "999", "vocab")


def test_run_prompt_needs_a_tokenizer(tmp_path):
    # Checked before the import, so an empty directory is enough to reach the check.
    assert_user_error(invoke("run", tmp_path, "--prompt", "hi"), "no tokenizer.json", "--tokens")


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "1,x"], "'x' is not an integer"),
    (["--tokens", "1", "--prompt", "hi"], "not both"),
    (["--tokens", "1", "--max-new-tokens", "300"], "256 positions"),
])
def test_run_rejects_bad_prompts(tiny, args, fragment):
    assert_user_error(invoke("run", tiny, *args), fragment)


def test_make_tiny_rejects_unknown_arch_and_foreign_directories(tmp_path):
    assert_user_error(invoke("make-tiny", tmp_path / "x", "--arch", "bert"), "bert", "gpt2")
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(invoke("make-tiny", tmp_path), "not empty")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (int(1.2 * 2**20), "1.2 MiB"), (3 * 2**30, "3.0 GiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_readme_quick_start_is_the_cli_flow_and_the_ci_test_command():
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    quick_start = readme.split("## Quick start")[1].split("\n## ")[0]
    setup, test = re.findall(r"```sh\n(.*?)\n```", quick_start, re.DOTALL)
    assert "\n" not in setup and "\n" not in test  # each is one shell line
    # tests/test_example_model.py runs these two commands.
    assert setup.endswith("llmc compile examples/models/stdlib-llama-6m --target cpu -o build/stdlib-cpu "
                          "&& python build/stdlib-cpu generate --prompt 'def fibonacci(n):' --max-tokens 32")
    test_command = "python -m pytest -q -x --timeout=600 tests"
    assert test.endswith("&& " + test_command)
    assert test_command in (repo / ".ci" / "run").read_text()
    assert test_command.replace("python", "$(PYTHON)", 1) in (repo / "Makefile").read_text()
