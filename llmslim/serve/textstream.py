"""Token ids to text deltas for streaming: incremental detokenization plus stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
tokenizers that merge spaces, so each step decodes a short window of recent tokens and emits only
what is new once it no longer ends in an incomplete character. Stop strings are matched on the text,
not the tokens; text that could still be the start of a stop string is held back until it cannot,
so a stop string is never emitted, even partly.
"""

from __future__ import annotations

from dataclasses import dataclass

_INCOMPLETE = "\ufffd"  # what a decoder yields for a partial UTF-8 sequence


@dataclass
class Delta:
    """New text to send, and whether a stop string ended the generation."""

    text: str
    stopped: bool = False


class TextStream:
    """Turns the generated token ids of one sequence into text deltas.

    Args:
        tokenizer: the model's tokenizer (only `decode` is used).
        stop: stop strings; generation ends at the first one, which is not part of the output.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix_offset = 0  # decode window start: a few tokens of context for correct spacing
        self._read_offset = 0  # tokens before this are already in `_text`
        self._text = ""  # everything decoded so far
        self._sent = 0  # characters of `_text` already emitted

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return self._text[: self._sent]

    def push(self, token_id: int) -> Delta:
        """Add one generated token; return the text that can be sent now."""
        self._ids.append(token_id)
        self._text += self._decode_new(final=False)
        return self._release()

    def finish(self) -> Delta:
        """The generation ended for another reason (length, end of sequence): flush what is left."""
        self._text += self._decode_new(final=True)
        delta = self._release()
        if delta.stopped:
            return delta
        rest = self._text[self._sent :]
        self._sent = len(self._text)
        return Delta(delta.text + rest)

    def _decode_new(self, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self) -> Delta:
        """Emit up to a stop string (and stop), or up to the longest tail that could begin one."""
        hit = self._first_stop()
        if hit is not None:
            delta, self._sent = self._text[self._sent : hit], hit
            self._text = self._text[:hit]
            return Delta(delta, stopped=True)
        safe = len(self._text) - self._held_back()
        delta = self._text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return Delta(delta)

    def _first_stop(self) -> int | None:
        found = [i for i in (self._text.find(s, max(0, self._sent - len(s) + 1)) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        tail = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), tail, -1):
                if self._text.endswith(stop[:n]):
                    tail = n
                    break
        return tail
