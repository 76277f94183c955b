"""Log-probabilities of generated tokens, and the token strings and bytes the OpenAI formats show with them.

The log-probabilities are those of the distribution the model produced: the log-softmax of the raw
logits, before penalties, temperature, top-k/top-p/min-p (vLLM's default, `raw_logprobs`). So they do
not depend on the sampling options, and a greedy answer's logprobs equal a forward pass's.

A token's `bytes` are its exact UTF-8 bytes (a byte-level BPE token may hold part of a character);
its `token` string is those bytes decoded, with U+FFFD for an incomplete character.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

FLOOR = -9999.0  # the logprob reported for a token of zero probability (JSON has no -inf), as OpenAI and vLLM do


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its log-probability, and the most likely tokens at that step (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under the raw `logits` of shape (vocab,), and the `top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())  # (top,), (top,)
    alternatives = tuple((int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, _finite(float(logprobs[token])), alternatives)


def _finite(value: float) -> float:
    return max(value, FLOOR)


class TokenText:
    """Token id -> (string, bytes) for one tokenizer, cached.

    Args:
        tokenizer: a Hugging Face tokenizer. Byte-level BPE (GPT-2, Llama 3, SmolLM) and SentencePiece
            byte fallback (`<0x0A>`) tokens map to their exact bytes; other tokens to the UTF-8 of their decoding.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._byte_level = _decoder_types(tokenizer) & {"ByteLevel"}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ()) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def _bytes(self, token: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if token in self._special:
            return piece.encode()
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if "\u2581" in piece:  # SentencePiece's space marker
            return piece.replace("\u2581", " ").encode()
        return self._tokenizer.decode([token]).encode()


def _decoder_types(tokenizer) -> set[str]:
    """The `type`s of the fast tokenizer's decoder (and of its parts, for a `Sequence`)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())  # the decoder's own JSON, not the whole tokenizer's
    return {state.get("type")} | {part.get("type") for part in state.get("decoders", [])}


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _bytes_to_unicode()


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict:
    """`choices[i].logprobs` of a chat completion (or chunk): `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def item(token: int, logprob: float) -> dict:
        return {"token": text.text(token), "logprob": logprob, "bytes": list(text.bytes(token))}

    content = [item(e.token, e.logprob) | {"top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content}


def completion_logprobs(entries: list[TokenLogprob], text: TokenText, offset: int = 0) -> dict:
    """`choices[i].logprobs` of a legacy completion: tokens, token_logprobs, top_logprobs and text_offset.

    `top_logprobs[j]` maps the strings of the most likely tokens and of the chosen one to their logprobs (up
    to k + 1 entries, as OpenAI documents); `text_offset[j]` is where token j starts in the completion text,
    counting the token strings before it from `offset`.
    """
    tokens = [text.text(e.token) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [{text.text(i): lp for i, lp in e.top} | {text.text(e.token): e.logprob} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top, "text_offset": offsets}
