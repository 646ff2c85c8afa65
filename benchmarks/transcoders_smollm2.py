"""A small real run: per-layer TopK transcoders for every SmolLM2-135M layer and a TopK cross-layer transcoder over
all of them, trained together from one pass over the offline corpus, then evaluated on held-out text.

Training: one `ActivationStore` over the 30 layers' (`blocks.L.mlp.hook_in`, `blocks.L.hook_mlp_out`) pairs (one
forward per batch for everything) and one `nnsae.train` call with 30 transcoder configs and one CLT config. This is
the same as the command line

    nnsae train --transcoder --clt --layers 0-29 --arch topk --k 16 --expansion 4 ...

except that here the CLT gets its own width (`--clt-expansion`).

Evaluation, per layer, on `--eval-batches` held-out batches of the offline corpus' test split (special tokens left
out, as in training): explained variance of the MLP output (pooled, float64: 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²) and L0, of
each layer's transcoder and of the CLT (whose layer-L output sums the contributions of layers 0..L), on the true
MLP inputs. Then the CE loss with every MLP output replaced (per-layer set, or CLT) in one forward, special tokens
keeping the true MLP output, and its CE loss score against zero-ablating every MLP output:
`(CE_ablated − CE_replaced) / (CE_ablated − CE_clean)`. The replacement is done with plain torch forward hooks.

Run: `python -m benchmarks.transcoders_smollm2 [--out /work/tc-run] [--tokens 65536] [--batch 2048] [--expansion 4]
[--clt-expansion 2] [--norm-batches 2]`.
Writes `{out}/run/` (the trained transcoders: SAELens folders and a circuit-tracer CLT folder) and
`{out}/results.md`, `{out}/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, markdown_table
from nnsae.circuits import load_transcoders
from nnsae.harvest import ActivationStore, Harvester
from nnsae.hooks import get_module, mlp_points
from nnsae.training import TrainConfig, train


def explained_variance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.double(), y_hat.double()
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def replaced_logits(model, tokens: torch.Tensor, special: torch.Tensor, replace) -> torch.Tensor:
    """Logits with each layer's MLP output replaced by `replace(layer, mlp_input, true_output)` (special positions
    keep the true output), through forward hooks on the read and write points `mlp_points` names."""
    n_layers = model.config.num_hidden_layers
    inputs, handles = {}, []
    for layer in range(n_layers):
        spec = mlp_points(model, layer)
        read, write = get_module(model, spec.read.module), get_module(model, spec.write.module)
        if spec.read.io == "input":
            handles.append(read.register_forward_pre_hook(
                lambda m, args, layer=layer: inputs.__setitem__(layer, args[0])))
        else:
            handles.append(read.register_forward_hook(lambda m, i, o, layer=layer: inputs.__setitem__(layer, o)))
        handles.append(write.register_forward_hook(
            lambda m, i, o, layer=layer: torch.where(special[..., None], o, replace(layer, inputs[layer], o))))
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        for h in handles:
            h.remove()


def token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                             reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/work/tc-run")
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens")
    parser.add_argument("--batch", type=int, default=2048, help="tokens per training step")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--expansion", type=float, default=4, help="per-layer transcoder width / d_model")
    parser.add_argument("--clt-expansion", type=float, default=2, help="CLT latents per layer / d_model")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 8 × 128 tokens")
    parser.add_argument("--norm-batches", type=int, default=2, help="batches for the activation-norm estimate "
                                                                     "(expected_average_only_in; 0: no scaling)")
    args = parser.parse_args()
    os.environ.setdefault("NNSAE_KEEP_FREED_HEAP", "1")
    from nnsae import load_smollm2

    out = Path(args.out)
    model, tokenizer = load_smollm2()
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    ins = [f"blocks.{i}.mlp.hook_in" for i in range(n_layers)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    # SmolLM2's MLP outputs range over orders of magnitude between layers (and tokens): each hook is scaled to mean
    # norm √d_model for training (one factor per hook, folded into the saved weights).
    scaling = dict(normalize_activations="expected_average_only_in", n_batches_for_norm_estimate=args.norm_batches) \
        if args.norm_batches else {}
    common = dict(architecture="topk", k=args.k, training_tokens=args.tokens, eval_every=0, log_every=5, **scaling)
    cfgs = [TrainConfig(hook=i, hook_out=o, expansion_factor=args.expansion, name=f"layer_{layer}", **common)
            for layer, (i, o) in enumerate(zip(ins, outs))]
    cfgs.append(TrainConfig(hook=ins, hook_out=outs, expansion_factor=args.clt_expansion, name="clt", **common))
    store = ActivationStore(model, [h for pair in zip(ins, outs) for h in pair], tokenizer=tokenizer,
                            context_size=128, batch_size_tokens=args.batch, store_batch_size_prompts=8,
                            n_batches_in_buffer=4)
    start = time.perf_counter()
    trained = train(model, cfgs, store, out / "run", resume=True, progress=True)
    train_seconds = time.perf_counter() - start
    per_layer = [trained[f"layer_{i}"] for i in range(n_layers)]
    clt = load_transcoders(out / "run" / "clt")  # read back from circuit-tracer's layout

    tokens = torch.cat(store.held_out_batches(args.eval_batches, 8))
    special = torch.isin(tokens, store.excluded_ids)
    keep = ~special.flatten()
    harvester = Harvester(model, ins + outs)
    acts = [a.flatten(0, 1)[keep] for a in harvester(tokens)]
    x, y = acts[:n_layers], acts[n_layers:]
    rows, results = [], []
    with torch.no_grad():
        clt_acts = [clt.encode_layer(x[i], i) for i in range(n_layers)]
        clt_out = clt.decode(clt_acts)
        for layer in range(n_layers):
            tc = per_layer[layer]
            feats, recon = tc.encode_decode(x[layer])
            record = {"layer": layer, "tc_ev": explained_variance(y[layer], recon),
                      "tc_l0": float((feats != 0).sum(-1).float().mean()),
                      "clt_ev": explained_variance(y[layer], clt_out[layer]),
                      "clt_l0": float((clt_acts[layer] != 0).sum(-1).float().mean())}
            results.append(record)
            rows.append([layer, f"{record['tc_ev']:.3f}", f"{record['tc_l0']:.1f}", f"{record['clt_ev']:.3f}",
                         f"{record['clt_l0']:.1f}"])

    def clt_replace(layer: int, mlp_in: torch.Tensor, true_out: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            cache.clear()
        cache[layer] = clt.encode_layer(mlp_in, layer)
        return sum(cache[s] @ clt.W_dec[s][:, layer - s] for s in range(layer + 1)) + clt.b_dec[layer]

    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        clean = token_ce(model(tokens).logits, tokens)
    mask = ~special[:, :-1].flatten()
    ce = {"clean": float(clean[mask].mean())}
    for name, replace in (("ablated", lambda layer, i, o: torch.zeros_like(o)),
                          ("per-layer transcoders", lambda layer, i, o: per_layer[layer].reconstruct(i)),
                          ("CLT", clt_replace)):
        ce[name] = float(token_ce(replaced_logits(model, tokens, special, replace), tokens)[mask].mean())
    scores = {name: (ce["ablated"] - ce[name]) / (ce["ablated"] - ce["clean"])
              for name in ("per-layer transcoders", "CLT")}

    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    text = [f"Machine: {machine_line()}",
            f"Training: {args.tokens} tokens, batch {args.batch}, {n_layers} per-layer TopK transcoders (d_sae "
            f"{per_layer[0].cfg.d_sae}, k {args.k}) and a TopK CLT (d_sae {clt.d_transcoder} per layer, "
            f"{clt.d_transcoder * n_layers} latents, k {args.k} per layer), one pass: {train_seconds:.0f} s; "
            f"activation scaling: {'on' if args.norm_batches else 'off'}.",
            f"Held-out: {int(keep.sum())} tokens.", "",
            markdown_table(["layer", "transcoder EV", "transcoder L0", "CLT EV", "CLT L0"],
                           rows + [["mean", f"{mean('tc_ev'):.3f}", f"{mean('tc_l0'):.1f}", f"{mean('clt_ev'):.3f}",
                                    f"{mean('clt_l0'):.1f}"]]), "",
            "CE loss with every MLP output replaced (special tokens keep theirs):", "",
            markdown_table(["model", "CE loss", "CE loss score"],
                           [["clean", f"{ce['clean']:.3f}", "1"], ["all MLPs zero-ablated", f"{ce['ablated']:.3f}", "0"],
                            ["per-layer transcoders", f"{ce['per-layer transcoders']:.3f}",
                             f"{scores['per-layer transcoders']:.3f}"],
                            ["CLT", f"{ce['CLT']:.3f}", f"{scores['CLT']:.3f}"]])]
    (out / "results.md").write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps({"per_layer": results, "ce": ce, "ce_loss_score": scores,
                                                  "train_seconds": train_seconds, "args": vars(args)}, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
