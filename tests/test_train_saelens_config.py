"""SAELens' LanguageModelSAERunnerConfig → nnsae: every name lands on its nnsae field, unsupported settings are refused
by name, and the mapped run trains; evaluations (CE/KL on held-out batches) and n_checkpoints during training."""

from __future__ import annotations

import json

import pytest
import torch

from nnsae import SAE
from nnsae.training import TrainConfig, from_saelens_config, train
from nnsae.harvest import ActivationStore
from tests.tiny_models import tiny_model, tiny_tokenizer

sae_lens = pytest.importorskip("sae_lens")
TEXTS = [f"Some words about item {i}, its colour, size {i % 7} and where it was found." for i in range(300)]


def runner_config(**overrides):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    kw = dict(sae=TopKTrainingSAEConfig(d_in=64, d_sae=128, k=6, aux_loss_coefficient=0.5,
                                        rescale_acts_by_decoder_norm=False),
              model_name="tiny-llama", hook_name="blocks.1.hook_resid_post", dataset_path="offline", context_size=32,
              training_tokens=4096, train_batch_size_tokens=256, store_batch_size_prompts=4, n_batches_in_buffer=4,
              lr=2e-3, lr_scheduler_name="cosineannealing", lr_warm_up_steps=3, lr_end=1e-4, adam_beta1=0.8,
              dead_feature_window=50, feature_sampling_window=100, prepend_bos=False, seed=7, n_checkpoints=2,
              n_eval_batches=2, exclude_special_tokens=True,
              logger=LoggingConfig(log_to_wandb=False, wandb_log_frequency=2, eval_every_n_wandb_logs=4))
    kw.update(overrides)
    return LanguageModelSAERunnerConfig(**kw)


def test_every_runner_name_maps_to_its_nnsae_field():
    for cfg in (runner_config(), runner_config().to_dict()):
        run = from_saelens_config(cfg)
        t = run.train_config
        assert isinstance(t, TrainConfig) and t.architecture == "topk" and t.hook == "blocks.1.hook_resid_post"
        assert (t.d_sae, t.k, t.aux_loss_coefficient, t.rescale_acts_by_decoder_norm) == (128, 6, 0.5, False)
        assert (t.training_tokens, t.lr, t.lr_scheduler, t.lr_warm_up_steps, t.lr_end, t.adam_beta1) == (
            4096, 2e-3, "cosineannealing", 3, 1e-4, 0.8)
        assert (t.dead_feature_window, t.feature_sampling_window, t.seed, t.n_checkpoints) == (50, 100, 7, 2)
        assert (t.log_every, t.eval_every, t.n_eval_batches, t.wandb_project) == (2, 8, 2, None)
        assert run.store_kwargs == {"context_size": 32, "batch_size_tokens": 256, "store_batch_size_prompts": 4,
                                    "n_batches_in_buffer": 4, "prepend_bos": False, "exclude_special_tokens": True,
                                    "seed": 7}
        assert (run.model_name, run.dataset) == ("tiny-llama", "offline")


def test_unsupported_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"hook_head_index=3.*disable_concat_sequences=True"):
        from_saelens_config(runner_config(hook_head_index=3, disable_concat_sequences=True))


def test_mapped_run_trains_logs_evals_and_keeps_checkpoints(tmp_path):
    run = from_saelens_config(runner_config())
    saes = run.train(tiny_model("llama"), tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False)
    sae = saes[run.train_config.name or next(iter(saes))]
    folder = tmp_path / "out" / next(iter(saes))
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "model_performance_preservation/ce_loss_score" in line]
    assert [line["step"] for line in evals] == [8, 16]  # every wandb_log_frequency · eval_every_n_wandb_logs steps
    for line in evals:  # (a random tiny model: the score itself can be anything; it is checked in the next test)
        assert line["model_behavior_preservation/kl_div_with_sae"] >= 0 and "kl_div_score" in str(line)
    checkpoints = sorted(int(p.name) for p in (folder / "checkpoints").iterdir())
    assert checkpoints == [1536, 2816]  # first steps past 4096/3 and 2·4096/3 tokens, as SAELens' thresholds
    middle = SAE.load_from_disk(folder / "checkpoints" / "1536")
    assert middle.cfg.metadata.training_tokens == 1536 and not torch.equal(middle.W_dec, sae.W_dec)
    sae_lens.SAE.load_from_disk(str(folder / "checkpoints" / "2816"))  # SAELens layout


def test_evals_during_training_equal_evaluate_on_the_same_tokens(tmp_path):
    """The logged CE/KL numbers are nnsae.evaluate's, on the store's held-out batches, for the SAE of that step."""
    from nnsae.evals import ce_kl_metrics

    model, tok = tiny_model("llama"), tiny_tokenizer()
    store = ActivationStore(model, ["blocks.1.hook_resid_post"], TEXTS, tokenizer=tok, context_size=32,
                            batch_size_tokens=128, store_batch_size_prompts=4, n_batches_in_buffer=4,
                            eval_dataset=TEXTS[::-1])
    cfg = TrainConfig(architecture="standard", d_sae=96, training_tokens=128 * 6, eval_every=6, n_eval_batches=2,
                      name="s")
    sae = train(model, cfg, store, tmp_path / "o", progress=False)["s"]
    logged = [json.loads(line) for line in (tmp_path / "o" / "s" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in logged if "model_performance_preservation/ce_loss_score" in line]
    want = ce_kl_metrics(model, sae, store.held_out_batches(2), tokenizer=tok)
    assert logged[-1]["step"] == 6
    assert logged[-1]["model_performance_preservation/ce_loss_score"] == pytest.approx(
        want["model_performance_preservation"]["ce_loss_score"], rel=1e-6)
