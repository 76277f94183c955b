"""A teacher cache (`llmslim distill --teacher-cache DIR`): the teacher runs once, then never sits beside the student.

For every training block a run uses, per position, the teacher's top-k logits divided by the temperature (values,
float32, and token ids, int32) and the log-sum-exp of the others (float32) are stored in safetensors shards of up to
`BLOCKS_PER_SHARD` blocks (`shard-00000.safetensors`, ..., each with the indices of its blocks), with `manifest.json`
naming what they were computed from: the teacher (path, config hash, weights format, dtype), the tokenizer's hash, the
hash of all the training blocks, the block length, k and the temperature. A cache that matches is read instead of
running the teacher (a longer run adds the blocks it lacks); one that does not is refused with the field that
differs. Each shard is written under a temporary name and renamed, so an interrupted build leaves only whole shards,
and the next run computes only the blocks still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmslim.distill.losses import TeacherTopK

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
BLOCKS_PER_SHARD = 64
TENSORS = ("values", "ids", "tail")


@dataclass(frozen=True)
class CacheKey:
    """What a cache was computed from; every field must match for a run to use it."""

    teacher: str
    teacher_config_sha256: str
    teacher_weights: str
    teacher_dtype: str | None
    tokenizer_sha256: str
    data_sha256: str
    n_blocks: int
    block_size: int
    k: int
    temperature: float

    @classmethod
    def of(
        cls, teacher: Path, teacher_config, weights: str, dtype: str | None, tokenizer, blocks: torch.Tensor, k: int, temperature: float
    ):
        """The key of a run: `blocks` (n_blocks, block_size) are its training blocks.

        Raises:
            ValueError: k is not between 1 and the teacher's vocabulary size.
        """
        vocab = teacher_config.vocab_size
        if not isinstance(k, int) or not 1 <= k <= vocab:
            raise ValueError(f"teacher cache k must be between 1 and the teacher's vocabulary size {vocab}, got {k!r}")
        return cls(
            teacher=str(Path(teacher).resolve()),
            teacher_config_sha256=_sha256(teacher_config.to_json_string(use_diff=False).encode()),
            teacher_weights=weights,
            teacher_dtype=dtype,
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            data_sha256=_sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()),
            n_blocks=int(blocks.shape[0]),
            block_size=int(blocks.shape[1]),
            k=k,
            temperature=float(temperature),
        )


def tokenizer_sha256(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules (its serialised fast tokenizer, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256(text.encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TeacherCache:
    """The cached teacher logits in `folder`: which training blocks it holds, reading them (`read`), and computing the
    ones a run needs that it lacks (`fill`)."""

    def __init__(self, folder: Path, key: CacheKey, rows: dict[int, tuple[int, int]]):
        self.folder, self.key = folder, key
        self.rows = rows  # training block -> (shard, row in the shard)
        self._handles: dict[int, object] = {}

    @classmethod
    def open(cls, folder: str | Path, key: CacheKey) -> TeacherCache:
        """The cache in `folder` (none yet, or empty: nothing cached), checked against `key` and its shards read.

        Raises:
            ValueError: the folder holds a cache of another run (the first differing field is named), files that are
                not a cache, or a shard that cannot be read (truncated).
        """
        folder = Path(folder).expanduser()
        cache = cls(folder, key, {})
        if _read_manifest(folder, key) is None:
            return cache
        for path in sorted(folder.glob("shard-*.safetensors")):
            shard = int(path.stem.removeprefix("shard-"))
            for row, block in enumerate(cache._check_shard(shard).tolist()):
                cache.rows[block] = (shard, row)
        return cache

    def missing(self, blocks: list[int]) -> list[int]:
        """The training blocks among `blocks` the cache does not hold, sorted."""
        return sorted(set(blocks) - set(self.rows))

    def fill(self, blocks: torch.Tensor, needed: list[int], teacher, batch_size: int = 4, progress: bool = True) -> None:
        """Run `teacher` over the training blocks `needed` (indices into `blocks`, (n_blocks, block_size)) that the cache
        lacks, `BLOCKS_PER_SHARD` at a time, each group written as one new shard.

        Raises:
            ValueError: the folder holds another run's cache or files that are not a cache.
        """
        todo = self.missing(needed)
        if not todo:
            return
        if _read_manifest(self.folder, self.key) is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_manifest(self.folder, self.key)
        device = next(teacher.parameters()).device
        bar = tqdm(total=len(todo), desc="teacher cache", unit="block", disable=None if progress else True)
        shard = max((s for s, _ in self.rows.values()), default=-1) + 1
        for first in range(0, len(todo), BLOCKS_PER_SHARD):
            group = torch.tensor(todo[first : first + BLOCKS_PER_SHARD])  # (g,)
            parts = []
            for batch in group.split(batch_size):
                ids = blocks[batch].to(device)  # (b, block_size)
                with torch.no_grad():
                    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                parts.append(TeacherTopK.from_logits(logits, self.key.k, self.key.temperature))
                bar.update(len(batch))
            tensors = {name: torch.cat([getattr(p, name) for p in parts]).cpu().contiguous() for name in TENSORS}
            _write_shard(_shard_path(self.folder, shard), {**tensors, "blocks": group})
            self.rows.update({block: (shard, row) for row, block in enumerate(group.tolist())})
            shard += 1
        bar.close()

    def read(self, block_index: torch.Tensor, device: torch.device | str = "cpu") -> TeacherTopK:
        """The cached teacher logits of the training blocks `block_index` (batch,): (batch, block_size, k) and (batch, block_size).

        Raises:
            ValueError: a block is not in the cache.
        """
        rows = {name: [] for name in TENSORS}
        for block in block_index.tolist():
            if block not in self.rows:
                raise ValueError(f"training block {block} is not in the teacher cache {self.folder}: fill it first (TeacherCache.fill)")
            shard, row = self.rows[block]
            handle = self._handle(shard)
            for name in TENSORS:
                rows[name].append(handle.get_slice(name)[row])
        return TeacherTopK(*(torch.stack(rows[name]).to(device) for name in TENSORS))

    def nbytes(self) -> int:
        """Bytes of the shards on disk."""
        return sum(_shard_path(self.folder, s).stat().st_size for s in {s for s, _ in self.rows.values()})

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
        return self._handles[shard]

    def _check_shard(self, shard: int) -> torch.Tensor:
        """The training blocks a shard holds, after checking its tensors' shapes and its size."""
        path = _shard_path(self.folder, shard)
        try:
            handle = self._handle(shard)
            blocks = handle.get_tensor("blocks")
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in TENSORS}
            n, length, k = len(blocks), self.key.block_size, self.key.k
            expected = {"values": [n, length, k], "ids": [n, length, k], "tail": [n, length]}
            size_ok = path.stat().st_size >= 4 * n * length * (2 * k + 1)
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ValueError(
                f"teacher cache shard {path} cannot be read ({err}): it is truncated or damaged; use a new cache folder"
            ) from err
        if shapes != expected or not size_ok:
            raise ValueError(f"teacher cache shard {path} holds shapes {shapes}, expected {expected}: use a new cache folder")
        return blocks


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _read_manifest(folder: Path, key: CacheKey) -> dict | None:
    """The folder's manifest if it is this key's; None for a missing or empty folder.

    Raises:
        ValueError: another key (the first differing field named), an unreadable manifest, or a non-empty folder
            without one.
    """
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise ValueError(f"--teacher-cache {folder} is a file: give a folder (empty, or holding a teacher cache)")
    path = folder / MANIFEST
    if not path.exists():
        others = sorted(p.name for p in folder.iterdir())
        if others:
            raise ValueError(
                f"--teacher-cache {folder} holds {others[:3]} but no {MANIFEST}: it is not a teacher cache; give an empty or new folder"
            )
        return None
    try:
        manifest = json.loads(path.read_text())
        saved = manifest["key"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a teacher cache manifest ({err}): give an empty or new folder") from err
    for field, value in asdict(key).items():
        if saved.get(field) != value:
            raise ValueError(
                f"the teacher cache in {folder} was built for another run: {field} is {saved.get(field)!r} there and "
                f"{value!r} now; use another --teacher-cache folder (this one is left as it is)"
            )
    return manifest


def _write_manifest(folder: Path, key: CacheKey) -> None:
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "blocks_per_shard": BLOCKS_PER_SHARD, "key": asdict(key)}, indent=2) + "\n")
    os.replace(tmp, path)


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"
