"""Direct logit effects of SAE features: what a feature's decoder direction does to the next-token logits.

For feature i with decoder row `W_dec[i]` the effect on token t is

    effect[i, t] = ((M(W_dec[i]) − c) ⊙ g) · W_U[t]  −  mean over the vocabulary of the same

- `M`: the map from the SAE's output space into the residual stream. The identity when the SAE writes a residual-
  stream value (resid_pre/mid/post, attn_out, mlp_out, or a transcoder's output there); when it writes the input of
  a linear output projection (`attn.hook_z` → `o_proj`/`c_proj`, `mlp.hook_post` → `down_proj`), that projection's
  weight: `W_dec[i] @ W_O`.
- `c`: the mean of the direction over d_model when the final norm is a LayerNorm (which subtracts the mean, so a
  constant component has no effect); 0 for RMSNorm.
- `g`: the final norm's effective per-dimension gain, *measured* by probing the norm module with ±1 inputs of unit
  RMS (so Gemma's `1 + weight`, LayerNorm's `weight`, and dtype casts are all captured without family-specific code);
  its bias adds the same amount to every feature and drops out. The norm's 1/RMS scale depends on the whole
  residual stream, not on the feature, and is left out.
- `W_U`: the unembedding, `model.get_output_embeddings().weight` (`lm_head`); its bias is constant and drops out.
- centred over the vocabulary (the mean effect over all tokens is subtracted), as TransformerLens' `center_unembed`
  does, so the numbers match SAEDashboard/Neuronpedia's `W_dec[i] @ W_U` on a TransformerLens model processed with
  `fold_ln` and `center_unembed`. Ranking of tokens is unaffected by the centring.

The final norm is located generically: the module whose output is exactly what `lm_head` receives in a short
forward pass (the innermost such module), e.g. `model.norm`, `transformer.ln_f`, `gpt_neox.final_layer_norm`.
Final logit soft-capping (Gemma 2) is monotone and applied after this, so it is not included.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from nnsae.seam import as_nnsight, unwrap_model
from nnsae.hooks import get_module, resolve_hook


_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (lm_head, norm name, norm, d_model)


class LogitEffectsUnavailable(ValueError):
    """The model/SAE pair has no well-defined direct path from the decoder to the logits (the reason says why)."""


@dataclass
class LogitLens:
    """Everything needed to turn decoder rows into direct logit effects (see the module docstring)."""

    W_U: torch.Tensor  # [vocab, d_model], float32
    gain: torch.Tensor  # [d_model]
    centre: bool  # LayerNorm-style final norm: remove the direction's mean over d_model
    pre_map: torch.Tensor | None  # [d_out, d_model] from the SAE's output space into the residual stream
    norm_name: str | None
    head_name: str
    map_name: str | None
    vocab_size: int
    description: str
    formula: str

    def directions(self, W_dec_rows: torch.Tensor) -> torch.Tensor:
        """Decoder rows [n, d_out] → the residual-stream directions the unembedding reads, after the norm's gain."""
        d = W_dec_rows.detach().to(device=self.W_U.device, dtype=torch.float32)
        if self.pre_map is not None:
            d = d @ self.pre_map
        if self.centre:
            d = d - d.mean(-1, keepdim=True)
        return d * self.gain

    def effects(self, W_dec_rows: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """[n, vocab] logit effects (centred over the vocabulary), float32 on CPU."""
        out = []
        for start in range(0, W_dec_rows.shape[0], batch):
            e = self.directions(W_dec_rows[start:start + batch]) @ self.W_U[: self.vocab_size].T
            out.append((e - e.mean(-1, keepdim=True)).cpu())
        if not out:
            return torch.zeros(0, self.vocab_size)
        return torch.cat(out)


def _first(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return value[0] if value else None
    if isinstance(value, dict):  # ModelOutput
        return next(iter(value.values()), None)
    return value


def _find_final_norm(hf: nn.Module, head: nn.Module) -> tuple[str | None, nn.Module | None, int]:
    """(name, module) of the innermost module whose output is what `head` reads; (None, None) when that is a
    module with children (no separate final norm). Also returns d_model."""
    captured: dict[str, torch.Tensor] = {}
    records: list[tuple[str, nn.Module, Any]] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else next(iter(kwargs.values()))

    handles = [head.register_forward_pre_hook(pre, with_kwargs=True)]
    for name, module in hf.named_modules():
        if module is head or module is hf or not name:
            continue
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: records.append((name, m, _first(o)))))
    vocab = head.weight.shape[0] if getattr(head, "weight", None) is not None else 2
    ids = torch.tensor([[1 % vocab]], device=head.weight.device)
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    x = captured.get("x")
    if x is None:
        raise LogitEffectsUnavailable("the output embedding (lm_head) was not called in a forward pass")
    matches = [(name, m) for name, m, o in records
               if isinstance(o, torch.Tensor) and o.shape == x.shape and torch.equal(o, x)]
    if not matches:
        return None, None, x.shape[-1]
    name, module = min(matches, key=lambda nm: len(list(nm[1].modules())))
    if len(list(module.children())) > 0:
        return None, None, x.shape[-1]
    return name, module, x.shape[-1]


def _patterns(d: int) -> list[torch.Tensor]:
    """Probe vectors of mean 0 whose non-zeros are ±1 and together cover every coordinate."""
    if d % 2 == 0:
        return [torch.tensor([1.0, -1.0]).repeat(d // 2)]
    first = torch.cat([torch.tensor([1.0, -1.0]).repeat((d - 1) // 2), torch.zeros(1)])
    return [first, first.roll(1)]


def _probe_norm(norm: nn.Module, d: int) -> tuple[torch.Tensor, bool]:
    """(effective gain [d], whether the norm removes the mean) of a per-dimension-gain RMSNorm/LayerNorm."""
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")

    def run(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _first(norm(v.to(device=device, dtype=dtype)[None, None]))[0, 0].float()

    gain = torch.zeros(d, device=device)
    for v in _patterns(d):
        v = v.to(device)
        v_hat = v / v.pow(2).mean().sqrt()  # unit RMS, mean 0: both norms see exactly v_hat
        diff = (run(v) - run(-v)) / 2  # bias cancels
        nz = v != 0
        gain[nz] = diff[nz] / v_hat[nz]
    v = _patterns(d)[0].to(device)
    scale = float(run(v).abs().max().clamp(min=1e-6))
    centres = bool(torch.allclose(run(v + 0.5), run(v), atol=1e-3 * scale))
    # Sanity check on a random direction: the norm must act as (centred) x / rms(x) * gain + bias.
    w = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
    w = w - w.mean()
    w = w / w.pow(2).mean().sqrt()
    bias = (run(v) + run(-v)) / 2
    if not torch.allclose(run(w), w * gain + bias, atol=2e-2 * scale, rtol=2e-2):
        raise LogitEffectsUnavailable(f"the final norm ({type(norm).__name__}) does not act as a per-dimension gain "
                                      "on normalised input")
    return gain, centres


def _write_map(hf: nn.Module, model: Any, sae: Any, d_model: int) -> tuple[torch.Tensor | None, str | None, str]:
    """(matrix from the SAE's output space into the residual stream or None for the identity, its module name,
    description of the write point)."""
    spec = resolve_hook(model, sae)
    point = spec.write
    where = f"`{point.module}` {point.io}"
    if point.normalize is not None:
        raise LogitEffectsUnavailable(f"the SAE writes a normalised activation ({where}), which is not in the residual "
                                      "stream")
    module = get_module(hf, point.module)
    d_out = sae.cfg.output_dim
    if point.io == "input" and isinstance(module, nn.Linear):
        if module.in_features != d_out or module.out_features != d_model:
            raise LogitEffectsUnavailable(f"{where} is a linear map {module.in_features}→{module.out_features}, "
                                          f"not {d_out}→{d_model}")
        return module.weight.detach().float().T, point.module, where
    if point.io == "input" and type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layers
        weight = module.weight.detach().float()
        if tuple(weight.shape) != (d_out, d_model):
            raise LogitEffectsUnavailable(f"{where} is a Conv1D of shape {tuple(weight.shape)}, not ({d_out}, "
                                          f"{d_model})")
        return weight, point.module, where
    is_layer = point.module.rsplit(".", 1)[-1].isdigit()
    is_norm = "norm" in type(module).__name__.lower()
    if point.io == "input" and not (is_layer or is_norm):
        raise LogitEffectsUnavailable(f"the SAE writes the input of `{point.module}` ({type(module).__name__}), "
                                      "which is not the residual stream nor a linear projection into it")
    if d_out != d_model:
        raise LogitEffectsUnavailable(f"the SAE's output width {d_out} is not the residual width {d_model}")
    return None, None, where


def logit_lens(model: Any, sae: Any, vocab_size: int | None = None) -> LogitLens:
    """The `LogitLens` of `sae` in `model` (an HF causal LM or nnsight wrapper), or `LogitEffectsUnavailable`.

    `vocab_size` (e.g. `len(tokenizer)`) limits the tokens to real ones when the unembedding is padded."""
    nn_model = as_nnsight(model)
    hf = unwrap_model(nn_model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise LogitEffectsUnavailable("the model has no output embeddings (lm_head)")
    head_name = next(name for name, m in hf.named_modules() if m is head)
    W_U = head.weight.detach().float()
    cached = _NORMS.get(hf)
    if cached is None or cached[0] is not head:
        cached = (head, *_find_final_norm(hf, head))
        _NORMS[hf] = cached
    _, norm_name, norm, d_model = cached
    if W_U.shape[1] != d_model:
        raise LogitEffectsUnavailable(f"lm_head weight {tuple(W_U.shape)} does not read d_model={d_model}")
    pre_map, map_name, where = _write_map(hf, nn_model, sae, d_model)
    if norm is not None:
        gain, centre = _probe_norm(norm, d_model)
        gain = gain.to(W_U.device)
    else:
        gain, centre = torch.ones(d_model, device=W_U.device), False
    if pre_map is not None:
        pre_map = pre_map.to(W_U.device)
    vocab = W_U.shape[0] if vocab_size is None else min(int(vocab_size), W_U.shape[0])

    terms = "W_dec[i]" if pre_map is None else "W_dec[i] @ W_O"
    if centre:
        terms = f"({terms} − its mean over d_model)"
    if norm is not None:
        gain_text = (f"g = effective per-dimension gain of the final norm `{norm_name}` ({type(norm).__name__}, "
                     f"measured{'; mean-removing' if centre else ''})")
        formula = f"({terms} ⊙ g) @ W_Uᵀ"
    else:
        gain_text = "no final norm found before the unembedding"
        formula = f"{terms} @ W_Uᵀ"
    formula += ", centred over the vocabulary"
    notes = []
    if pre_map is not None:
        notes.append(f" W_O = the weight of `{map_name}` (as a map from its input into the residual stream).")
    softcap = getattr(getattr(hf, "config", None), "final_logit_softcapping", None)
    if softcap:
        notes.append(f" Pre-softcap logits (the model's final tanh soft-cap at {softcap} is monotone).")
    description = (
        f"Direct logit effect of each feature's decoder direction (the SAE writes {where}): {formula}. {gain_text}; "
        f"W_U = `{head_name}`.weight ({vocab} × {d_model}); the mean over the vocabulary is subtracted, as "
        f"TransformerLens' center_unembed does. The norm's 1/RMS scale (which depends on the whole residual) and "
        f"biases are left out, as in SAEDashboard/Neuronpedia's W_dec[i] @ W_U with folded LayerNorm." + "".join(notes)
    )
    return LogitLens(W_U=W_U, gain=gain, centre=centre, pre_map=pre_map, norm_name=norm_name, head_name=head_name,
                     map_name=map_name, vocab_size=vocab, description=description, formula=formula)


def logit_effects(model: Any, sae: Any, features: Sequence[int] | None = None, vocab_size: int | None = None
                  ) -> torch.Tensor:
    """[len(features), vocab] direct logit effects of `features` (default: all) of `sae` in `model`."""
    lens = logit_lens(model, sae, vocab_size)
    index = torch.arange(sae.cfg.d_sae) if features is None else torch.as_tensor(list(features), dtype=torch.long)
    return lens.effects(sae.W_dec.detach()[index.to(sae.W_dec.device)])


__all__ = ["LogitEffectsUnavailable", "LogitLens", "logit_effects", "logit_lens"]
