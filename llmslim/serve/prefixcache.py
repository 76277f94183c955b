"""Prefix caching: prompts that start alike (a system prompt, a few-shot block) reuse the keys and values of that start.

    prefill(prompt) --store--> entry: the KV of the prompt's first ⌊len / BLOCK⌋ blocks, indexed at every block boundary
    next prompt --lookup--> the longest boundary it shares with an entry (at most len - 1 tokens: one token is always
                            computed, for the first logits) -> a copy of that many tokens' KV; only the rest is prefilled

Boundaries are found by a chained hash of the blocks (hash of the previous boundary's hash and this block's tokens),
then checked token by token, so a hash collision can never reuse the wrong keys. Entries are evicted least recently
used first once their bytes pass `max_bytes`; an entry that another one extends is dropped (the longer one answers
for both). Two prompts that share only a part each keep their own copy of it: simple, and bounded by `max_bytes`.

A hit computes the same tokens as a miss: the prefix's keys and values are those the full prefill wrote, and the rest
attends to them under a causal mask aligned to the cached length (`kvcache._suffix_mask`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmslim.serve.kvcache import SequenceKV

BLOCK = 16  # tokens per block: prefixes are cached and matched in whole blocks


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # a whole number of blocks
    kv: SequenceKV
    nbytes: int


@dataclass
class PrefixStats:
    """Counters read by /metrics."""

    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0  # prompt tokens not recomputed
    evictions: int = 0


class PrefixCache:
    """KV caches of prompt prefixes, least recently used first out.

    Args:
        max_bytes: most bytes of keys and values held; 0 turns caching off.
        block: tokens per block.
    """

    def __init__(self, max_bytes: int, block: int = BLOCK):
        if max_bytes < 0 or block < 1:
            raise ValueError(f"max_bytes must be >= 0 and block >= 1, got {max_bytes} and {block}")
        self.max_bytes, self.block = max_bytes, block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id, least recently used first
        self._owners: dict[int, list[int]] = {}  # chained hash of a boundary -> ids of the entries that hold it
        self._next_id = 0
        self.nbytes = 0
        self.stats = PrefixStats()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[SequenceKV | None, int]:
        """A fresh copy of the KV of the longest cached prefix of `prompt` (shorter than it), and that prefix's length."""
        if not self.enabled:
            return None, 0
        self.stats.lookups += 1
        for length, key in reversed(self._chain(prompt, len(prompt) - 1)):
            for entry_id in reversed(self._owners.get(key, ())):
                entry = self._entries[entry_id]
                if list(entry.tokens[:length]) != prompt[:length]:  # a hash collision: never reuse the wrong keys
                    continue
                self._entries.move_to_end(entry_id)
                self.stats.hits += 1
                self.stats.hit_tokens += length
                return entry.kv.prefix(length), length
        return None, 0

    def store(self, prompt: list[int], kv: SequenceKV) -> None:
        """Keep the KV of `prompt`'s whole blocks (`kv` holds at least them); nothing when they are already cached."""
        chain = self._chain(prompt, min(len(prompt), kv.length))
        if not self.enabled or not chain:
            return
        length, last = chain[-1]
        for entry_id in self._owners.get(last, ()):
            if list(self._entries[entry_id].tokens[:length]) == prompt[:length]:  # already held (as long or longer)
                self._entries.move_to_end(entry_id)
                return
        entry = _Entry(tuple(prompt[:length]), kv.prefix(length), 0)
        entry.nbytes = entry.kv.nbytes
        if entry.nbytes > self.max_bytes:
            return
        for _, key in chain:  # an entry this one extends is no longer needed
            for other in list(self._owners.get(key, ())):
                shorter = self._entries[other].tokens
                if len(shorter) < length and list(shorter) == prompt[: len(shorter)]:
                    self._drop(other)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        for _, key in chain:
            self._owners.setdefault(key, []).append(entry_id)
        self._entries[entry_id] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1

    def _chain(self, tokens, limit: int) -> list[tuple[int, int]]:
        """(length, chained hash) at each block boundary of `tokens` up to `limit` tokens."""
        chain, key = [], 0
        for end in range(self.block, limit + 1, self.block):
            key = hash((key, tuple(tokens[end - self.block : end])))
            chain.append((end, key))
        return chain

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        for _, key in self._chain(entry.tokens, len(entry.tokens)):
            owners = self._owners[key]
            owners.remove(entry_id)
            if not owners:
                del self._owners[key]
