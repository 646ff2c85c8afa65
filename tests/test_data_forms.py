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


def test_every_entry_point_gives_identical_activations_for_identical_text(tmp_path):
    import nnsae
    from nnsae import SAE, SAEConfig
    from nnsae.harvest import ActivationStore
    from tests.tiny_models import tiny_model

    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = chunks_of(TEXTS, tok)
    forms = {"texts": (TEXTS, tok), "dataset": (datasets.Dataset.from_dict({"text": TEXTS}), tok),
             "tensor": (rows, None), "tokens column": (datasets.Dataset.from_dict({"tokens": rows.tolist()}), None)}
    kw = dict(context_size=CTX, batch_size_tokens=32, store_batch_size_prompts=4, n_batches_in_buffer=2)
    batches = {name: next(iter(ActivationStore(model, ["blocks.1.hook_resid_post"], data, tokenizer=t, **kw)))
               for name, (data, t) in forms.items()}
    for name, batch in batches.items():
        assert torch.equal(batch["blocks.1.hook_resid_post"], batches["texts"]["blocks.1.hook_resid_post"]), name

    sae = SAE.from_config(SAEConfig(architecture="topk", k=4, d_in=64, d_sae=32,
                                    metadata={"hook_name": "blocks.1.hook_resid_post", "context_size": CTX}))
    records = {name: nnsae.evaluate(model, sae, data, tokenizer=t, n_tokens=4 * CTX, n_ce_tokens=2 * CTX,
                                    context_size=CTX, batch_size_prompts=2, progress=False)["metrics"]
               for name, (data, t) in forms.items()}
    for name, metrics in records.items():
        assert metrics == records["texts"], name
    for name, (data, t) in forms.items():
        out = nnsae.extract(model, [sae], data, tmp_path / name.replace(" ", "_"), tokenizer=t, context_size=CTX,
                            n_tokens=4 * CTX, progress=False)
        assert torch.equal(nnsae.load_feature_stats(out, "blocks.1.hook_resid_post")["firing_count"],
                           nnsae.load_feature_stats(tmp_path / "texts", "blocks.1.hook_resid_post")["firing_count"])


def test_store_from_sae_reads_the_saes_metadata_and_gives_token_batches():
    from nnsae import SAE, SAEConfig
    from nnsae.harvest import ActivationStore
    from tests.tiny_models import tiny_model

    sae = SAE.from_config(SAEConfig(architecture="standard", d_in=64, d_sae=32, metadata={
        "hook_name": "blocks.0.hook_resid_pre", "context_size": CTX, "prepend_bos": False,
        "exclude_special_tokens": False}))
    store = ActivationStore.from_sae(tiny_model("llama"), sae, TEXTS, tokenizer=tiny_tokenizer(),
                                     store_batch_size_prompts=3, batch_size_tokens=16)
    assert store.hooks == ["blocks.0.hook_resid_pre"] and store.context_size == CTX and store.prepend_bos is False
    assert store.exclude_special_tokens is False
    tokens = store.get_batch_tokens()
    want = torch.stack([c.tokens for c in pack(iter_documents(TEXTS), tiny_tokenizer(), CTX, prepend_bos=False)])
    assert torch.equal(tokens, want[:3]) and torch.equal(store.get_batch_tokens(), want[3:6])
