"""Every form of data an entry point takes gives the same chunks for the same text, and TransformerLens'
tokenize_and_concatenate is matched row for row."""

from __future__ import annotations

import datasets
import pytest
import torch

from nnsae.data import iter_documents, pack, tokenize_and_concatenate
from tests.tiny_models import tiny_tokenizer

TEXTS = [f"Document {i} talks about the number {i * 7} and a few other things." for i in range(40)]
CTX = 16


def chunks_of(data, tokenizer=None, **kw) -> torch.Tensor:
    return torch.stack([c.tokens for c in pack(iter_documents(data, **kw), tokenizer, CTX)])


def test_text_forms_pack_identically():
    tok = tiny_tokenizer()
    want = chunks_of(TEXTS, tok)
    assert torch.equal(chunks_of(datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(40))}), tok), want)
    iterable = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    assert torch.equal(chunks_of(iterable, tok), want)
    assert torch.equal(chunks_of(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}), tok),
                       want)
    assert torch.equal(chunks_of(datasets.Dataset.from_dict({"body": TEXTS}), tok, text_column="body"), want)


def test_token_forms_are_used_as_they_are_without_a_tokenizer():
    tok = tiny_tokenizer()
    rows = chunks_of(TEXTS, tok)  # packed once; the rows are then handed over pre-tokenized
    assert torch.equal(chunks_of(rows), rows)
    assert torch.equal(chunks_of(rows.tolist()), rows)
    assert torch.equal(chunks_of(datasets.Dataset.from_dict({"tokens": rows.tolist()})), rows)
    assert torch.equal(chunks_of(datasets.Dataset.from_dict({"input_ids": rows.tolist()})), rows)
    longer = torch.cat([rows, rows], dim=1)  # rows longer than the context are cut, as SAELens does
    assert torch.equal(chunks_of(longer), rows)
    with pytest.raises(ValueError, match="fewer than context_size=16"):
        chunks_of(rows[:, :8])


@pytest.mark.parametrize("bad, message", [
    (3.5, "Unsupported data: float"),
    ([1.5, 2.5], "item 0 is a float"),
    ({"text": ["a"]}, "a dict"),
    (torch.randn(2, 16), "integer ids shaped"),
])
def test_bad_data_names_what_was_given_and_what_is_accepted(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        list(iter_documents(bad))
    assert "a list of strings" in str(error.value) or "integer ids" in str(error.value)


def test_text_without_a_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match="Text data needs a tokenizer"):
        chunks_of(TEXTS)


@pytest.mark.parametrize("add_bos_token", [True, False])
@pytest.mark.parametrize("max_length", [24, 4096])  # many rows per map batch; one short, padded row per batch
def test_tokenize_and_concatenate_equals_transformer_lens(add_bos_token, max_length):
    tl_utils = pytest.importorskip("transformer_lens.utilities.tokenize_utils")
    texts = TEXTS * 30  # 1,200 rows: two map batches, the second shorter
    dataset = datasets.Dataset.from_dict({"text": texts, "other": list(range(len(texts)))})
    ours = tokenize_and_concatenate(dataset, tiny_tokenizer(), max_length=max_length, add_bos_token=add_bos_token)
    theirs = tl_utils.tokenize_and_concatenate(dataset, tiny_tokenizer(), max_length=max_length,
                                               add_bos_token=add_bos_token, num_proc=None)
    assert ours.column_names == theirs.column_names == ["tokens"]
    assert torch.equal(torch.stack(list(ours["tokens"])), torch.stack(list(theirs["tokens"])))
    assert torch.equal(chunks_of(ours), torch.stack(list(ours["tokens"]))[:, :CTX])  # taken as pre-tokenized
