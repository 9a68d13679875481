"""IncrementalDetokenizer on tokenizers trained in the test: byte-level BPE (GPT-2 style), "▁" pieces with
byte fallback (Llama style) and one token per character; multi-byte characters, context spaces, stops."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.tokenizer import PackageTokenizer

CORPUS = ["héllo wörld 日本語 🙂 naïve café"] * 20 + ["hello world, the quick brown fox ### jumps"] * 20
SPECIAL = ["<unk>", "<eos>"]


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # A small vocabulary leaves some characters split across tokens ("wÃ" + "¶rld").
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL,
        show_progress=False))
    return tokenizer


def sentencepiece_bpe() -> Tokenizer:
    """Llama's layout: "▁" for spaces, <0xNN> byte pieces for characters outside the vocabulary."""
    ascii_pieces = Tokenizer(models.BPE())
    ascii_pieces.pre_tokenizer = pre_tokenizers.Metaspace()
    ascii_pieces.train_from_iterator([t for t in CORPUS if t.isascii()],
                                     trainers.BpeTrainer(vocab_size=80, show_progress=False))
    trained = json.loads(ascii_pieces.to_str())["model"]
    vocab = {"<unk>": 0, "<eos>": 1, **{f"<0x{b:02X}>": b + 2 for b in range(256)}}
    for piece in trained["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer


def char_level() -> Tokenizer:
    chars = sorted(set("".join(CORPUS)))
    tokenizer = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(SPECIAL)},
                                            **{c: i + len(SPECIAL) for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer


BUILDERS = {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_bpe, "char_level": char_level}


@functools.cache
def tokenizer(name: str) -> PackageTokenizer:
    return PackageTokenizer(BUILDERS[name](), {})


def encode(name: str, text: str) -> list[int]:
    return tokenizer(name).encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


# Characters of 1 to 4 UTF-8 bytes, in and out of the training text, and now and then anything at all.
TEXT = st.text(st.one_of(st.sampled_from("abc hlo wörld#\n日本語🙂é"), st.characters(codec="utf-8")), max_size=30)


@pytest.mark.parametrize("name", BUILDERS)
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_deltas_join_to_the_decoded_text_and_never_split_a_character(name, text):
    ids = encode(name, text)
    detok = IncrementalDetokenizer(tokenizer(name), prompt_ids=[])
    deltas = stream(detok, ids)
    rest = detok.flush()
    full = tokenizer(name).decode(ids)
    assert "".join(deltas) + rest == detok.text == full
    if not full.endswith("\ufffd"):  # a text ending in U+FFFD waits for the next token, or flush()
        assert rest == ""
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", BUILDERS)
@settings(max_examples=40, deadline=None)
@given(prompt=TEXT, text=TEXT)
def test_output_decodes_in_the_context_of_the_prompt(name, prompt, text):
    prompt_ids, ids = encode(name, prompt), encode(name, text)
    detok = IncrementalDetokenizer(tokenizer(name), prompt_ids)
    deltas = stream(detok, ids) + [detok.flush()]
    assert tokenizer(name).decode(prompt_ids) + "".join(deltas) == tokenizer(name).decode(prompt_ids + ids)


def test_the_first_token_keeps_its_leading_space_after_the_prompt():
    ids = encode("sentencepiece", "hello world")  # ▁hello ▁wor l d
    prompt_ids, output_ids = ids[:1], ids[1:]
    assert tokenizer("sentencepiece").decode(output_ids) == "world"  # alone, "▁wor" loses its space
    assert stream(IncrementalDetokenizer(tokenizer("sentencepiece"), prompt_ids), output_ids) == [" wor", "l", "d"]


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_a_character_split_across_tokens_comes_out_whole(name):
    ids = encode(name, "🙂")
    assert len(ids) >= 3, "the emoji should take several byte tokens"
    assert stream(IncrementalDetokenizer(tokenizer(name), []), ids) == [""] * (len(ids) - 1) + ["🙂"]


def test_flush_gives_an_unfinished_character_as_the_tokenizer_decodes_it():
    ids = encode("byte_level", "🙂")[:2]
    detok = IncrementalDetokenizer(tokenizer("byte_level"), [])
    assert stream(detok, ids) == ["", ""]
    assert detok.flush() == tokenizer("byte_level").decode(ids) and "\ufffd" in detok.text


def test_special_tokens_are_skipped_unless_asked_for():
    eos = tokenizer("char_level").tokenizer.token_to_id("<eos>")
    ids = encode("char_level", "ab") + [eos]
    assert stream(IncrementalDetokenizer(tokenizer("char_level"), []), ids) == ["a", "b", ""]
    kept = IncrementalDetokenizer(tokenizer("char_level"), [], skip_special_tokens=False)
    assert stream(kept, ids) == ["a", "b", "<eos>"]


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    detok = IncrementalDetokenizer(tokenizer("char_level"), encode("char_level", "###"), stop=["###"])
    deltas = stream(detok, encode("char_level", "ab#c##d###ef"))
    # "#" and "##" are held until "c" and "d" show they are not the stop string; the prompt is not searched.
    assert deltas == ["a", "b", "", "#c", "", "", "##d", "", "", "", "", ""]
    assert detok.text == "ab#c##d" and detok.stopped == "###"
    assert detok.add(0) == "" and detok.flush() == ""


def test_a_stop_string_across_multi_byte_tokens():
    detok = IncrementalDetokenizer(tokenizer("byte_level"), [], stop=["日本"])
    assert "".join(stream(detok, encode("byte_level", "wörld 日本語"))) == detok.text == "wörld "
    assert detok.stopped == "日本"


def test_include_stop_str_in_output():
    detok = IncrementalDetokenizer(tokenizer("char_level"), [], stop=["##", "fox"], include_stop_str_in_output=True)
    assert "".join(stream(detok, encode("char_level", "the fox ##"))) == detok.text == "the fox"
    assert detok.stopped == "fox"


def test_flush_releases_a_held_partial_stop_string():
    detok = IncrementalDetokenizer(tokenizer("char_level"), [], stop=["###"])
    assert stream(detok, encode("char_level", "ab##")) == ["a", "b", "", ""]
    assert detok.flush() == "##" and detok.text == "ab##" and detok.stopped is None


def cut_at_first_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: the first position where some stop string ends; the longer one if two end there."""
    for end in range(1, len(text) + 1):
        ended = [s for s in stops if text[:end].endswith(s)]
        if ended:
            stop = max(ended, key=len)
            return text[:end] if include else text[:end - len(stop)], stop
    return text, None


@pytest.mark.parametrize("name", ["byte_level", "char_level"])
@settings(max_examples=60, deadline=None)
@given(text=st.text("ab#é日", max_size=25), stops=st.lists(st.text("ab#é日", min_size=1, max_size=4), min_size=1,
                                                          max_size=3), include=st.booleans())
def test_stop_strings_match_a_character_by_character_reference(name, text, stops, include):
    detok = IncrementalDetokenizer(tokenizer(name), [], stop=stops, include_stop_str_in_output=include)
    deltas = stream(detok, encode(name, text)) + [detok.flush()]
    # The deltas only ever grow the text, so equal to the reference at the end means no delta ever
    # carried part of a stop string that completed later.
    assert ("".join(deltas), detok.stopped) == (detok.text, detok.stopped) == cut_at_first_stop(text, stops, include)


def test_empty_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(tokenizer("char_level"), [], stop=[""])
