"""Data: reading sources, the held-out split, packing, and the errors for empty or too-short data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA

from llmslim.train.data import is_datasets_available, load_splits, pack_blocks, prepare_data, read_documents, split_documents
from train.tiny import TEXT, char_tokenizer, write_text


def test_single_document_holds_out_its_last_characters():
    splits = split_documents(["abcdefghij" * 10], eval_fraction=0.1)
    assert splits.train == ["abcdefghij" * 9] and splits.eval == ["abcdefghij"]


def test_several_documents_hold_out_the_last_documents():
    splits = split_documents([f"doc {i}" for i in range(20)], eval_fraction=0.1)
    assert splits.train == [f"doc {i}" for i in range(18)] and splits.eval == ["doc 18", "doc 19"]


def test_tiny_shakespeare_eval_split_is_its_last_tenth():
    path = DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    text = path.read_text(encoding="utf-8")
    splits = load_splits(path)
    assert splits.eval[0] == text[-len(splits.eval[0]) :] and splits.train[0] + splits.eval[0] == text
    assert len(splits.eval[0]) == 111_540  # ceil(10% of 1,115,394 characters)


def test_jsonl_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "id": i}) for i in range(3)) + "\n\n")
    assert read_documents(path, text_field="body") == ["text 0", "text 1", "text 2"]
    with pytest.raises(ValueError, match="line 1 has no string field 'text'.*--text-field"):
        read_documents(path)


def test_a_folder_needs_datasets(tmp_path):
    if is_datasets_available():
        pytest.skip("datasets is installed")
    with pytest.raises(ValueError, match="`datasets` is not installed"):
        read_documents(tmp_path)


def test_pack_blocks_drops_the_tail_and_frames_encoder_blocks():
    assert torch.equal(pack_blocks(torch.arange(10), 4), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    framed = pack_blocks(torch.arange(5), 4, prefix=[100], suffix=[101])  # (2, 4): [CLS] two tokens [SEP]
    assert torch.equal(framed, torch.tensor([[100, 0, 1, 101], [100, 2, 3, 101]]))


def test_prepare_data_packs_both_splits(tmp_path):
    data = prepare_data(char_tokenizer(), load_splits(write_text(tmp_path)), block_size=16)
    n_tokens = len(TEXT) + 2  # one token per character, an <eos> after each split's document
    assert data.train.shape[1] == 16 and data.eval.shape[1] == 16
    assert (data.train.shape[0] + data.eval.shape[0]) * 16 <= n_tokens
    assert data.train[0, 0].item() == char_tokenizer()("t").input_ids[0]  # the text starts with "to be"


def test_empty_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no text"):
        load_splits(write_text(tmp_path, "  \n\n"))


def test_too_short_data_is_refused(tmp_path):
    splits = load_splits(write_text(tmp_path, "to be or not to be\n" * 3))
    with pytest.raises(ValueError, match="the eval split has .* tokens, fewer than one block of block_size=16.*--block-size"):
        prepare_data(char_tokenizer(), splits, block_size=16)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
