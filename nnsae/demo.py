"""The main job on the embedded default: SmolLM2-135M, offline text, a TopK SAE from harvest to dashboard.

`python -m nnsae.demo [--out demo-output] [--tokens 400000]` (what `make demo` runs). Every step uses the same
library calls a user would: harvest → train → evaluate → attach in a trace → ablate → dashboard.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nnsight
import torch

import nnsae
from nnsae.harvest import KEEP_FREED_HEAP_ENV

PROMPT = "When John and Mary went to the shops, John gave the bag to"
LAYER_HOOK = "model.layers.6"


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _interesting_features(density: list[float], prompt_acts: torch.Tensor, n: int) -> list[int]:
    """Half the most frequent features that are not dense (< 10% of tokens), half the strongest on the prompt:
    features a newcomer can read, never a block of dead ones."""
    density_t = torch.tensor(density)
    frequent = torch.where(density_t < 0.1, density_t, torch.zeros_like(density_t)).argsort(descending=True)
    strongest = prompt_acts.max(0).values.argsort(descending=True)
    chosen: list[int] = []
    for ranking in (strongest[: n - n // 2], frequent):
        for feature in ranking.tolist():
            if len(chosen) >= n:
                break
            if feature not in chosen and density[feature] > 0:
                chosen.append(feature)
    return sorted(chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--tokens", type=float, default=4e5, help="training tokens")
    parser.add_argument("--features", type=int, default=24, help="features in the dashboard")
    parser.add_argument("--dashboard-tokens", type=int, default=16_384, help="tokens scanned for the dashboard")
    args = parser.parse_args(argv)
    os.environ.setdefault(KEEP_FREED_HEAP_ENV, "1")  # this process is nnsae's own (see nnsae.harvest)
    out = Path(args.out)
    torch.manual_seed(0)

    t = _step("Loading SmolLM2-135M-Instruct (embedded GGUF, offline)")
    hf_model, tokenizer = nnsae.load_smollm2()
    model = nnsight.NNsight(hf_model)
    print(f"   {type(hf_model).__name__}, {hf_model.config.num_hidden_layers} layers, "
          f"d_model {hf_model.config.hidden_size} ({time.perf_counter() - t:.0f} s)")

    t = _step(f"Harvesting {LAYER_HOOK} activations from the offline corpus and training a TopK SAE")
    store = nnsae.ActivationStore(model, [LAYER_HOOK], "offline", tokenizer=tokenizer, context_size=128,
                                  batch_size_tokens=4096, store_batch_size_prompts=16, n_batches_in_buffer=8)
    cfg = nnsae.TrainConfig(architecture="topk", k=32, expansion_factor=8, training_tokens=int(args.tokens),
                            name="layer6-topk", log_every=20)
    sae = nnsae.train(model, cfg, store, out=out / "runs", resume=True)["layer6-topk"]
    print(f"   trained {sae} in {time.perf_counter() - t:.0f} s → {out / 'runs' / 'layer6-topk'}")

    t = _step("Evaluating on held-out offline text (SAELens metrics)")
    record = nnsae.evaluate(model, sae, "offline", tokenizer=tokenizer, n_tokens=16_384, n_ce_tokens=4_096,
                            out=out / "eval.json", plots=True)
    m = record["metrics"]
    print(f"   L0 {m['sparsity']['l0']:.1f}   explained variance {m['reconstruction_quality']['explained_variance']:.3f}"
          f"   CE loss score {m['model_performance_preservation']['ce_loss_score']:.3f}"
          f"   (CE clean {m['model_performance_preservation']['ce_loss_without_sae']:.3f}, "
          f"with SAE {m['model_performance_preservation']['ce_loss_with_sae']:.3f}, "
          f"zero-ablated {m['model_performance_preservation']['ce_loss_with_ablation']:.3f})"
          f"   ({time.perf_counter() - t:.0f} s) → {out / 'eval.json'}")

    _step(f"Top features per token of {PROMPT!r}, read inside a trace")
    tokens = tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.trace(tokens):
        handle = nnsae.attach(model, sae, use_error_term=True)
        feats = handle.hook_sae_acts_post.output.save()
        clean_logits = model.output.logits.save()
    for i, tok_id in enumerate(tokens[0].tolist()):
        top = feats[0, i].topk(3)
        listed = ", ".join(f"#{j} {v:.1f}" for v, j in zip(top.values.tolist(), top.indices.tolist()))
        print(f"   {tokenizer.decode([tok_id])!r:>12}  {listed}")

    feature = int(feats[0, -1].argmax())
    _step(f"Ablating feature #{feature} at the last position (error term on, so only the feature changes)")
    with model.trace(tokens):
        handle = nnsae.attach(model, sae, use_error_term=True)
        handle.hook_sae_acts_post.output[:, -1, feature] = 0
        ablated_logits = model.output.logits.save()
    for name, logits in (("clean", clean_logits), ("ablated", ablated_logits)):
        probs = logits[0, -1].softmax(-1)
        top = probs.topk(3)
        listed = ", ".join(f"{tokenizer.decode([j])!r} {p:.3f}" for p, j in zip(top.values.tolist(),
                                                                                top.indices.tolist()))
        print(f"   {name:>8}: {listed}")

    summary = {"sae": str(out / "runs" / "layer6-topk"), "eval": str(out / "eval.json"), "feature_ablated": feature,
               "metrics": {k: m[k] for k in ("sparsity", "reconstruction_quality", "model_performance_preservation")}}
    chosen = _interesting_features(record["feature_metrics"]["feature_density"], feats[0], args.features)
    t = _step(f"Feature dashboard for {len(chosen)} live features: the most frequent (below 10% density) and the "
              "strongest on the prompt (one extraction pass, then static pages)")
    site = nnsae.dashboard(model, sae, dataset="offline", tokenizer=tokenizer, out=out / "dashboard",
                           features=chosen, n_tokens=args.dashboard_tokens)
    summary["dashboard"] = str(site)
    print(f"   open {site} ({time.perf_counter() - t:.0f} s)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDone. Everything is under {out}/ (summary.json lists it).")


if __name__ == "__main__":
    main()
