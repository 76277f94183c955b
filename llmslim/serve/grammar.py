"""Constrained decoding with llguidance: JSON schemas -> grammars -> a token mask on each step's logits.

    request (response_format / tool_choice) --compile_json_schema--> grammar (llguidance's JSON text, validated)
    engine, per constrained sequence:   Constraint(grammar) --masks()--> allowed tokens --sample--> consume(token)

Why llguidance (not xgrammar or outlines-core): it computes a mask in microseconds on a CPU without
precompiling per-schema tables (a new schema per request costs well under a millisecond to start,
outlines-core builds a full index first), it reads the Hugging Face tokenizer's own JSON, so
byte-level BPE (SmolLM2, GPT-2, Llama 3) and SentencePiece byte fallback are decoded exactly, its
wheel has no dependencies (xgrammar pulls torch and transformers versions of its own), and it validates
a schema up front with a message that says what is wrong, which becomes the 400 a client sees. The
masks of a batch's constrained rows are computed after its forward pass, each applied to its own row.

JSON is generated compactly, as `json.dumps` writes it (`", "` and `": "` separators, no other
whitespace): a small model cannot run off into endless whitespace, and every output parses.
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np
import torch

# the JSON layout generated: json.dumps' default separators and nothing else (no runaway whitespace)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile; the message says why (HTTP 400)."""


@functools.cache
def is_llguidance_available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Compiles JSON schemas for one tokenizer and starts matchers for them.

    The llguidance tokenizer is built on first use (about half a second for a 49k vocabulary), then reused.

    Args:
        tokenizer: a fast Hugging Face tokenizer (its `backend_tokenizer` is read as JSON).
        vocab_size: rows of the model's logits (may exceed the tokenizer's vocabulary; the extra ids are never allowed).
        eos_ids: end-of-sequence ids; the mask allows them once the output is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._hf_tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._mask_size = vocab_size  # the llguidance vocabulary: the model's ids and the tokenizer's (set on first use)
        self._lock = threading.Lock()
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The llguidance tokenizer (built once, thread-safe)."""
        with self._lock:
            if self._tokenizer is None:
                self._mask_size = max(self.vocab_size, len(self._hf_tokenizer))
                self._tokenizer = _llg_tokenizer(self._hf_tokenizer, self._mask_size, self._eos)
        return self._tokenizer

    def compile_json_schema(self, schema: dict, field: str) -> str:
        """The grammar of JSON documents valid under `schema`; raises `GrammarError` naming `field` when it cannot be compiled."""
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise GrammarError(f"{field} must be a JSON schema object, got {type(schema).__name__}: {_quote(schema)}")
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        except Exception as err:  # llguidance raises plain ValueErrors / RuntimeErrors
            raise GrammarError(f"{field} is not a JSON schema this server can enforce: {err}") from None
        return self._validated(grammar, f"{field} is not a JSON schema this server can enforce")

    def compile_lark(self, lark: str, field: str) -> str:
        """The grammar of a Lark text (llguidance's dialect, `%json {schema}` included); raises `GrammarError` naming `field`."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_lark(lark)
        except Exception as err:
            raise GrammarError(f"{field} cannot be enforced: {err}") from None
        return self._validated(grammar, f"{field} cannot be enforced")

    def _validated(self, grammar: str, what: str) -> str:
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"{what}: {error.strip()}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for one sequence."""
        from llguidance import LLMatcher

        return Constraint(LLMatcher(self.tokenizer, grammar, log_level=0))

    def masks(self, constraints: list[Constraint]) -> torch.Tensor:
        """Allowed tokens of each constraint's next step, (len(constraints), vocab) bool.

        Computed one row after the other on the calling thread: tens of microseconds a row. llguidance's parallel
        executor was slower end to end on a 2-core CPU, its worker threads competing with the model's own.
        """
        words = (self._mask_size + 31) // 32
        bits = torch.zeros(len(constraints), words, dtype=torch.int32)  # (rows, words): bit t of row r = token t allowed
        for row, constraint in enumerate(constraints):
            constraint.matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
        allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, bitorder="little")  # (rows, words * 32)
        return torch.from_numpy(allowed[:, : self.vocab_size]).bool()  # (rows, vocab)


class Constraint:
    """The grammar state of one sequence: which tokens may come next, and whether the output is complete."""

    def __init__(self, matcher):
        self.matcher = matcher

    def consume(self, token: int) -> None:
        """Advance past `token` (which the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} that its own mask allowed: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing more may follow: the output is a whole document (the sequence ends with finish_reason "stop")."""
        return self.matcher.is_stopped()


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` (vocab,) with every token outside `allowed` (vocab,) bool set to -inf (a new tensor)."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def _llg_tokenizer(hf_tokenizer, vocab_size: int, eos: list[int]):
    from llguidance import LLTokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GrammarError(f"structured output needs a fast (tokenizers) tokenizer; this model's is {type(hf_tokenizer).__name__}")
    return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)


def _quote(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def close_objects(schema):
    """`schema` with `"additionalProperties": false` on every object schema that lists `properties` and says nothing about
    others (OpenAI's strict mode; a function cannot take arguments it does not declare). Composition under `allOf` is
    left as it is (closing its branches would let nothing through)."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict) or "allOf" in schema:
        return schema
    out = {key: _close_children(key, value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_VALUES = ("items", "additionalItems", "prefixItems", "anyOf", "oneOf", "not", "if", "then", "else", "contains")


def _close_children(key: str, value):
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return {name: close_objects(sub) for name, sub in value.items()}
    if key in _SCHEMA_VALUES:
        return close_objects(value)
    return value
