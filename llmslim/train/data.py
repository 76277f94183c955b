"""Training text: read (text file, JSON lines, local `datasets` dataset), split, tokenize, pack.

A source becomes a list of documents; the held-out split is the last `eval_fraction` of the
documents (of the characters when there is a single document, so the last 10% of Tiny
Shakespeare is its evaluation split). Each split is tokenized, documents joined by a separator
token, and packed into fixed-length blocks; the tail shorter than a block is dropped.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@cache
def is_datasets_available() -> bool:
    """Whether the optional `datasets` package is installed."""
    return importlib.util.find_spec("datasets") is not None


@dataclass
class TextSplits:
    """Documents of the training and held-out splits."""

    train: list[str]
    eval: list[str]


@dataclass
class TokenData:
    """Tokenized splits.

    Args:
        train: training blocks, (n_blocks, block_size) token ids.
        eval: held-out blocks, (n_eval_blocks, block_size) token ids.
    """

    train: torch.Tensor
    eval: torch.Tensor

    @property
    def eval_ids(self) -> torch.Tensor:
        """The held-out blocks as one flat run of token ids."""
        return self.eval.reshape(-1)


def read_documents(source: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a text file (one document), a JSON-lines file, or a saved `datasets` dataset."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"training data {str(path)!r} does not exist: pass a text file, a .jsonl file or a saved dataset folder")
    if path.is_dir():
        return _read_dataset(path, text_field, split="train")
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    return [path.read_bytes().decode("utf-8").replace("\r\n", "\n")]


def load_splits(train: str | Path, eval: str | Path | None = None, eval_fraction: float = 0.1, text_field: str = "text") -> TextSplits:
    """The training and held-out documents.

    Args:
        train: the training source.
        eval: a separate held-out source; None holds out the end of `train`. A `datasets` folder
            with a `validation` or `test` split uses that split.
        eval_fraction: share of `train` held out when `eval` is None.
        text_field: the text column of JSON lines and datasets.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    docs = _non_empty(read_documents(train, text_field), train)
    if eval is not None:
        return TextSplits(docs, _non_empty(read_documents(eval, text_field), eval))
    held_out = _dataset_eval_split(Path(train), text_field)
    if held_out is not None:
        return TextSplits(docs, _non_empty(held_out, f"{train} (validation split)"))
    return split_documents(docs, eval_fraction)


def split_documents(docs: list[str], eval_fraction: float) -> TextSplits:
    """Hold out the last `eval_fraction` of the documents, or of the characters of a single one."""
    if len(docs) == 1:
        text = docs[0]
        cut = len(text) - math.ceil(len(text) * eval_fraction)
        return TextSplits([text[:cut]], [text[cut:]])
    n_eval = max(1, math.ceil(len(docs) * eval_fraction))
    return TextSplits(docs[:-n_eval], docs[-n_eval:])


def tokenize_documents(tokenizer, docs: list[str], separator_id: int | None) -> torch.Tensor:
    """All documents as one run of token ids, `separator_id` after each one (when not None)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if separator_id is not None:
            ids.append(separator_id)
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(ids: torch.Tensor, block_size: int, prefix: list[int] = (), suffix: list[int] = ()) -> torch.Tensor:
    """Cut `ids` into blocks of `block_size` tokens, each framed by `prefix` and `suffix` tokens."""
    body = block_size - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"block_size {block_size} leaves no room for text between {len(prefix) + len(suffix)} special tokens")
    n_blocks = ids.numel() // body
    blocks = ids[: n_blocks * body].view(n_blocks, body)  # (n_blocks, body)
    head = torch.tensor(list(prefix), dtype=torch.long).expand(n_blocks, len(prefix))  # (n_blocks, len(prefix))
    tail = torch.tensor(list(suffix), dtype=torch.long).expand(n_blocks, len(suffix))  # (n_blocks, len(suffix))
    return torch.cat([head, blocks, tail], dim=1)  # (n_blocks, block_size)


def prepare_data(
    tokenizer,
    splits: TextSplits,
    block_size: int,
    *,
    encoder: bool = False,
) -> TokenData:
    """Tokenize and pack both splits; an encoder's blocks are framed by [CLS] ... [SEP].

    Raises:
        ValueError: a split holds less than one block of tokens.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if encoder:
        separator, prefix, suffix = tokenizer.sep_token_id, [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    else:
        separator, prefix, suffix = tokenizer.eos_token_id, [], []
    blocks = {}
    for name, docs in (("train", splits.train), ("eval", splits.eval)):
        ids = tokenize_documents(tokenizer, docs, separator)
        blocks[name] = pack_blocks(ids, block_size, prefix, suffix)
        if blocks[name].shape[0] == 0:
            raise ValueError(
                f"the {name} split has {ids.numel()} tokens, fewer than one block of block_size={block_size}: "
                "use more text or a smaller --block-size"
            )
    return TokenData(blocks["train"], blocks["eval"])


def _non_empty(docs: list[str], source) -> list[str]:
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise ValueError(f"training data {str(source)!r} holds no text: pass a non-empty file or dataset")
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path} line {number} has no string field {text_field!r}: pass --text-field with the name of the text field")
        docs.append(record[text_field])
    return docs


def _load_dataset(path: Path):
    if not is_datasets_available():
        raise ValueError(f"{path} is a folder, read as a saved `datasets` dataset, but `datasets` is not installed: pip install datasets")
    import datasets

    return datasets.load_from_disk(str(path))


def _read_dataset(path: Path, text_field: str, split: str) -> list[str]:
    dataset = _load_dataset(path)
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise ValueError(f"dataset {path} has splits {list(dataset.keys())}, none named {split!r}")
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise ValueError(f"dataset {path} has columns {dataset.column_names}, not {text_field!r}: pass --text-field")
    return list(dataset[text_field])


def _dataset_eval_split(path: Path, text_field: str) -> list[str] | None:
    if not path.is_dir():
        return None
    dataset = _load_dataset(path)
    if not hasattr(dataset, "keys"):
        return None
    name = next((s for s in ("validation", "test") if s in dataset), None)
    return None if name is None else _read_dataset(path, text_field, name)
