"""Output token ids -> streamed text deltas: whole UTF-8 characters, spaces decoded in context, stop strings."""

from __future__ import annotations

from typing import Sequence

# Prompt tokens decoded before the first output token, so that it decodes as it would in context (its
# leading space under sentencepiece "▁", the rest of a character a prompt token began).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, one add() per token.

    Decoding works on a short window (the prefix/read-offset technique): each add() decodes the tokens
    from ``prefix_offset`` to ``read_offset`` (text already emitted, kept as context) and from
    ``prefix_offset`` to the end, and emits what the second adds to the first. While the decoded text
    ends with U+FFFD a character is still split across tokens, so nothing is emitted and the offsets
    stay. Work per token is bounded by the window, never the whole output.

    Stop strings: the text ends where any stop string first ends (with two ending there, the longer
    one), which is what token-by-token streaming would see whatever the tokenization. Text that could
    still grow into a stop string is held back until it is resolved, so no delta ever carries part of
    a stop string, and the deltas joined always equal ``text``. When the sequence ends for another
    reason (EOS, max_tokens), call flush() once for what is still held back.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer  # anything with .decode(ids: list[int], skip_special_tokens: bool) -> str
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._longest_stop = max(map(len, self.stop), default=0)
        self._ids = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        self._held = ""  # decoded text not yet emitted: it could be the start of a stop string
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far (the deltas joined); ends before the stop string once one matched."""
        return self._text

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, else None."""
        return self._stopped

    def add(self, token_id: int) -> str:
        """The text ``token_id`` adds; '' while it is held back (split character, possible stop string)."""
        if self._stopped is not None:
            return ""
        self._ids.append(int(token_id))
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At the end of a sequence not ended by a stop string: the text still held back, now emitted.

        An unfinished character comes out as U+FFFD, as ``tokenizer.decode`` writes it.
        """
        if self._stopped is not None:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text the tokens past ``read_offset`` add, once it ends in a whole character (or ``final``)."""
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def _release(self, new: str, final: bool) -> str:
        """Emit ``new`` (after what was held) up to a stop string, holding back a possible stop start."""
        pending = self._held + new
        match = self._first_stop(pending)
        if match is not None:
            start, stop = match
            delta = pending[:start + len(stop) if self.include_stop_str_in_output else start]
            self._stopped, self._held = stop, ""
        else:
            keep = 0 if final else self._partial_stop_length(pending)
            delta, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self._text += delta
        return delta

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """``(start, stop string)`` of the match in ``text`` that ends first (the longer one on a tie).

        Only the held text and the new text are searched: a match cannot start in emitted text, since the
        longest tail that could begin one is always held.
        """
        found = [(start + len(s), start, s) for s in self.stop if (start := text.find(s)) >= 0]
        if not found:
            return None
        _, start, stop = min(found)
        return start, stop

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the beginning of some stop string."""
        for length in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
