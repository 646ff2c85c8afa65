"""Transcoder and cross-layer transcoder training: losses and gradients against float64 dense autograd written here,
(MLP input, MLP output) pairs against plain torch hooks, resume, SAELens loading, circuit-tracer's CLT layout."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nnsae.architectures import SAE
from nnsae.circuits import CrossLayerTranscoder, TranscoderSet, load_transcoders
from nnsae.harvest import ActivationStore, Harvester
from nnsae.hooks import mlp_points
from nnsae.training import StepContext, TrainConfig, TrainingInterrupted, make_training_sae, train
from tests.test_train_store import FakeStore
from tests.tiny_models import N_LAYERS, tiny_model, tiny_tokenizer

D, D_SAE, N = 12, 40, 96
EPS = 0.05  # jumprelu_bandwidth


# ---- data --------------------------------------------------------------------------------------------------------

class PairStore(FakeStore):
    """FakeStore with layers 0..n-1 of `blocks.L.mlp.hook_in` and `blocks.L.hook_mlp_out`, each output a fixed
    nonlinear function of the input (so a transcoder can learn it)."""

    def __init__(self, n_layers: int = 2, d: int = 16, interrupt_at: int | None = None, **kw):
        hooks = {f"blocks.{i}.mlp.hook_in": d for i in range(n_layers)}
        hooks |= {f"blocks.{i}.hook_mlp_out": d for i in range(n_layers)}
        FakeStore.__init__(self, hooks=hooks, **kw)
        self.n_layers, self.interrupt_at = n_layers, interrupt_at
        g = torch.Generator().manual_seed(123)
        self.maps = [torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5 for _ in range(n_layers)]

    def global_batch(self, t):
        out = FakeStore.global_batch(self, t)
        for i in range(self.n_layers):
            x = out[f"blocks.{i}.mlp.hook_in"].double()
            out[f"blocks.{i}.hook_mlp_out"] = (torch.relu(x @ self.maps[i]) + 0.1 * x).to(self.dtype)
        return out

    def __iter__(self):
        for batch in FakeStore.__iter__(self):
            if self.interrupt_at is not None and self.pos == self.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # the trainer checkpoints and stops after this step
            yield batch


IN, OUT = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"


def clt_hooks(n: int) -> dict:
    return dict(hook=[f"blocks.{i}.mlp.hook_in" for i in range(n)], hook_out=[f"blocks.{i}.hook_mlp_out" for i in range(n)])


# ---- independent float64 references --------------------------------------------------------------------------------

def rect(u):
    return ((u > -0.5) & (u < 0.5)).double()


def ste_jumprelu(z, theta):
    """z·1[z>θ] whose θ-gradient is −(θ/ε)·rect((z−θ)/ε)·g (SAELens' straight-through estimator)."""
    mask = (z > theta).double().detach()
    surrogate = -(theta.detach() / EPS) * rect(((z - theta) / EPS).detach()) * theta
    return z * mask + (surrogate - surrogate.detach())


def ste_step(z, theta):
    """1[z>θ] whose θ-gradient is −(1/ε)·rect((z−θ)/ε)·g."""
    surrogate = -(1 / EPS) * rect(((z - theta) / EPS).detach()) * theta
    return (z > theta).double().detach() + (surrogate - surrogate.detach())


def reference_loss(arch: str, p: dict, x, y, coef: float, dead, k, widths) -> dict:
    """Losses of one transcoder step by plain dense autograd (SAELens 6 definitions; transcoders: no b_dec on the
    input, x̂ includes x W_skipᵀ)."""
    skip = x @ p["W_skip"].T if "W_skip" in p else 0.0
    z = x @ p["W_enc"] + p["b_enc"]
    mse = lambda a, b: (a - b).pow(2).sum(-1).mean()  # noqa: E731
    losses = {}
    if arch == "standard":
        f = torch.relu(z)
        y_hat = f @ p["W_dec"] + p["b_dec"] + skip
        losses["l1_loss"] = coef * (f * p["W_dec"].norm(dim=1)).sum(-1).mean()
    elif arch == "jumprelu":
        f = ste_jumprelu(z, p["threshold"])
        y_hat = f @ p["W_dec"] + p["b_dec"] + skip
        losses["l0_loss"] = coef * ste_step(z, p["threshold"]).sum(-1).mean()
    else:
        norms = p["W_dec"].norm(dim=1)
        h = z * norms
        if arch == "topk":
            mask = torch.zeros_like(h).scatter(1, h.detach().topk(k, dim=1).indices, 1.0)
        else:  # batchtopk/matryoshka: the top k·N of ReLU(h) over the whole batch
            flat = torch.relu(h.detach()).flatten()
            mask = torch.zeros_like(flat).scatter(0, flat.topk(int(k * x.shape[0])).indices, 1.0).view_as(h)
            mask = mask * (h.detach() > 0)
        f = torch.relu(h) * mask
        y_hat = (f / norms) @ p["W_dec"] + p["b_dec"] + skip
        for w in widths[:-1]:
            partial = (f[:, :w] / norms[:w]) @ p["W_dec"][:w] + p["b_dec"] + skip
            losses[f"inner_mse_loss_{w}"] = mse(partial, y)
        n_dead = int(dead.sum())
        k_aux = x.shape[1] // 2
        aux_h = h.masked_fill(~dead, float("-inf"))
        aux_mask = torch.zeros_like(h).scatter(1, aux_h.detach().topk(min(k_aux, n_dead), dim=1).indices, 1.0)
        e = ((h * aux_mask) / norms) @ p["W_dec"]
        losses["auxiliary_reconstruction_loss"] = min(n_dead / k_aux, 1.0) * mse(e, (y - y_hat).detach())
    losses["mse_loss"] = mse(y_hat, y)
    return losses


ARCHS = ["standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"]


def make_transcoder(arch: str, skip: bool, **kw):
    extra = dict(k=5) if arch in ("topk", "batchtopk") else dict(k=5, matryoshka_widths=[16]) \
        if arch == "matryoshka_batchtopk" else {}
    cfg = TrainConfig(architecture=arch, hook=IN, hook_out=OUT, d_sae=D_SAE, skip_connection=skip, dtype="float64",
                      jumprelu_bandwidth=EPS, training_tokens=N * 10, **extra, **kw).resolve(D, N)
    model = make_training_sae(cfg, D, D)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # away from the init: biases, thresholds and the skip path all matter
        for name, param in model.sae.named_parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g, dtype=param.dtype))
        if arch == "jumprelu":
            model.sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.3)
    return model, cfg


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch,path", [(arch, "sparse") for arch in ARCHS] +  # the TopK family: always sparse
                         [("standard", "dense"), ("jumprelu", "dense")])
def test_transcoder_loss_and_gradients_match_dense_autograd(arch, skip, path):
    model, cfg = make_transcoder(arch, skip)
    if path == "sparse" and arch in ("standard", "jumprelu"):
        model.density.fill_(0.0)  # the previous step was sparse: this one runs on the sparse kernels
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, D, generator=g, dtype=torch.float64) + torch.relu(x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    coef = 0.7
    ctx = StepContext(coefficients={"l1": coef, "l0": coef}, dead_mask=dead, target=y)
    out = model(x, ctx)
    out.loss.backward()

    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.sae.named_parameters()}
    ref = reference_loss(arch, params, x, y, coef, dead, cfg.k, cfg.matryoshka_widths)
    assert set(ref) == set(out.losses)
    for name, value in ref.items():
        torch.testing.assert_close(out.losses[name].detach(), value.detach(), rtol=1e-10, atol=1e-12, msg=name)
    sum(ref.values()).backward()
    for name, p in model.sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-11, msg=name)
    assert out.x is not None and torch.equal(out.x, y)  # metrics measure the target, not the input


# ---- cross-layer transcoders ----------------------------------------------------------------------------------------

def make_clt(arch: str, n: int, rescale: bool = True):
    extra = dict(k=4) if arch == "topk" else {}
    cfg = TrainConfig(architecture=arch, **clt_hooks(n), d_sae=D_SAE, dtype="float64", jumprelu_bandwidth=EPS,
                      rescale_acts_by_decoder_norm=rescale, training_tokens=N * 10, **extra).resolve(D, N)
    model = make_training_sae(cfg, D, D)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=g, dtype=param.dtype))
        if arch == "jumprelu":
            for theta in model.threshold:
                theta.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.3)
    return model, cfg


def clt_reference(model, x, y, coef: float) -> dict:
    """Σ_j mean‖ŷ_j − y_j‖² with ŷ_j = Σ_{i≤j} a_i W_dec_i[:, j−i] + b_dec_j, dense autograd; `x`, `y` [N, n, d]."""
    n, arch, k = model.n_layers, model.cfg.architecture, int(model.cfg.k)
    P = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    acts, l0 = [], 0.0
    for i in range(n):
        z = x[:, i] @ P[f"W_enc.{i}"] + P[f"b_enc.{i}"]
        if arch == "topk":
            score = z * P[f"W_dec.{i}"].flatten(1).norm(dim=1) if model.cfg.rescale_acts_by_decoder_norm else z
            mask = torch.zeros_like(z).scatter(1, score.detach().topk(k, dim=1).indices, 1.0)
            acts.append(z * mask)  # circuit-tracer's TopK: the selected values as they are (no ReLU)
        else:
            acts.append(ste_jumprelu(z, P[f"threshold.{i}"]))
            l0 = l0 + coef * ste_step(z, P[f"threshold.{i}"]).sum(-1).mean()
    mse = 0.0
    for j in range(n):
        y_hat = sum(acts[i] @ P[f"W_dec.{i}"][:, j - i] for i in range(j + 1)) + P["b_dec"][j]
        mse = mse + (y_hat - y[:, j]).pow(2).sum(-1).mean()
    losses = {"mse_loss": mse}
    if arch == "jumprelu":
        losses["l0_loss"] = l0
    return losses, P


@pytest.mark.parametrize("arch,rescale", [("topk", True), ("topk", False), ("jumprelu", False)])
def test_clt_loss_and_gradients_match_dense_autograd(arch, rescale):
    n = 4
    model, _ = make_clt(arch, n, rescale)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, n, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, n, D, generator=g, dtype=torch.float64)
    out = model(x, StepContext(coefficients={"l0": 0.3}, target=y))
    out.loss.backward()
    ref, P = clt_reference(model, x, y, 0.3)
    assert set(ref) == set(out.losses)
    for name, value in ref.items():
        torch.testing.assert_close(out.losses[name].detach(), value.detach(), rtol=1e-10, atol=1e-12)
    sum(ref.values()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_clt_export_computes_the_trained_reconstruction(arch, tmp_path):
    """The exported CrossLayerTranscoder (norms folded) reproduces the training forward; circuit-tracer's files
    hold what the layout says, read here independently of nnsae's loader, and load back to the same outputs."""
    n = 3
    model, _ = make_clt(arch, n)
    x = torch.randn(N, n, D, dtype=torch.float64)
    with torch.no_grad():
        trained = model(x, StepContext(coefficients={"l0": 0.0}, target=torch.zeros_like(x))).x_hat.view(N, n, D)
    clt = model.export()
    torch.testing.assert_close(clt(x.transpose(0, 1)).transpose(0, 1), trained, rtol=1e-9, atol=1e-10)

    from nnsae.circuits import save_transcoders

    save_transcoders(clt, tmp_path / "clt")
    config = yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    for i in range(n):
        enc = load_file(tmp_path / "clt" / f"W_enc_{i}.safetensors")
        dec = load_file(tmp_path / "clt" / f"W_dec_{i}.safetensors")
        assert enc[f"W_enc_{i}"].shape == (D_SAE, D) and dec[f"W_dec_{i}"].shape == (D_SAE, n - i, D)
        # layer 0's features write to layer 2 through W_dec_0[:, 2]
        if i == 0:
            a = clt.encode_layer(x[:, 0], 0)
            torch.testing.assert_close(a @ dec["W_dec_0"][:, 2].double(), a @ clt.W_dec[0][:, 2])
    loaded = load_transcoders(tmp_path / "clt", dtype=torch.float64)
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.activation == clt.activation
    torch.testing.assert_close(loaded(x.transpose(0, 1)).transpose(0, 1), trained, rtol=1e-9, atol=1e-10)


def test_clt_hooks_must_be_layers_from_zero():
    with pytest.raises(ValueError, match="blocks.0.X"):
        make_training_sae(TrainConfig(architecture="topk", k=2, d_sae=8, hook=["blocks.1.mlp.hook_in"],
                                      hook_out=["blocks.1.hook_mlp_out"]).resolve(D, N), D, D)
    with pytest.raises(ValueError, match="Cross-layer transcoders train with"):
        TrainConfig(architecture="batchtopk", **clt_hooks(2))


# ---- pairs from the model ----------------------------------------------------------------------------------------

# Per family, written out here (not taken from nnsae's table): the norm whose output is the MLP's input, the MLP, and
# the module whose output is TL's hook_mlp_out.
MLP_MODULES = {
    "gpt2": ("transformer.h.{}.ln_2", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
    "llama": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "qwen2": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "mistral": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "gemma2": ("model.layers.{}.pre_feedforward_layernorm", "model.layers.{}.mlp",
               "model.layers.{}.post_feedforward_layernorm"),
    "gemma3": ("model.layers.{}.pre_feedforward_layernorm", "model.layers.{}.mlp",
               "model.layers.{}.post_feedforward_layernorm"),
}


@pytest.mark.parametrize("family", sorted(MLP_MODULES))
def test_pairs_match_plain_torch_hooks(family):
    """mlp_points names the MLP's input and output; one harvest of several layers' pairs equals what plain torch
    hooks on the norm in front of the MLP and on the output module see, and stops after the deepest point."""
    model = tiny_model(family)
    norm, mlp, out = MLP_MODULES[family]
    layers = [0, N_LAYERS - 2]
    for layer in layers:
        spec = mlp_points(model, layer)
        assert (spec.read.module, spec.read.io) == (mlp.format(layer), "input")
        assert (spec.write.module, spec.write.io) == (out.format(layer), "output")
    hooks = [h for layer in layers for h in (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")]
    tokens = torch.randint(3, 100, (2, 7))
    harvester = Harvester(model, hooks)  # before the hooks below: its set-up probes the model with a forward
    expected, handles, calls = {}, [], []
    for layer in layers:
        for side, path in (("in", norm), ("out", out)):
            handles.append(model.get_submodule(path.format(layer)).register_forward_hook(
                lambda m, i, o, key=(layer, side): expected.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    handles.append(model.get_submodule(out.format(N_LAYERS - 1)).register_forward_hook(lambda *a: calls.append(1)))
    with torch.no_grad():
        model(tokens)
    calls.clear()
    harvested = dict(zip(hooks, harvester(tokens)))
    for h in handles:
        h.remove()
    assert not calls, "the forward ran past the deepest hook"
    for layer in layers:
        torch.testing.assert_close(harvested[f"blocks.{layer}.mlp.hook_in"], expected[(layer, "in")], rtol=0, atol=0)
        torch.testing.assert_close(harvested[f"blocks.{layer}.hook_mlp_out"], expected[(layer, "out")], rtol=0,
                                   atol=0)


def test_store_serves_aligned_pairs():
    """After the mixing buffer's shuffle, row r of the output hook is still the MLP of row r of the input hook."""
    model = tiny_model("llama")
    store = ActivationStore(model, [IN, OUT, "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"],
                            ["some text for the tiny model " * 20] * 8, tokenizer=tiny_tokenizer(),
                            context_size=16, batch_size_tokens=32, store_batch_size_prompts=2, n_batches_in_buffer=4)
    batch = next(iter(store))
    for layer in (0, 1):
        mlp = model.model.layers[layer].mlp
        with torch.no_grad():
            torch.testing.assert_close(mlp(batch[f"blocks.{layer}.mlp.hook_in"]),
                                       batch[f"blocks.{layer}.hook_mlp_out"], rtol=1e-5, atol=1e-6)


# ---- the trainer: files, SAELens, resume --------------------------------------------------------------------------

def tc_configs(n_layers: int = 2, **kw) -> list[TrainConfig]:
    common = dict(training_tokens=64 * 12, eval_every=0, log_every=3, dead_feature_window=4, **kw)
    cfgs = []
    for layer in range(n_layers):
        hooks = dict(hook=f"blocks.{layer}.mlp.hook_in", hook_out=f"blocks.{layer}.hook_mlp_out")
        cfgs += [TrainConfig(architecture="topk", k=3, d_sae=32, **hooks, **common),
                 TrainConfig(architecture="batchtopk", k=3, d_sae=32, skip_connection=True, **hooks, **common),
                 TrainConfig(architecture="jumprelu", d_sae=24, lr=3e-3, skip_connection=layer == 1, **hooks,
                             **common),
                 TrainConfig(architecture="standard", d_sae=24, lr=3e-3, **hooks, **common)]
    cfgs.append(TrainConfig(architecture="topk", k=3, d_sae=24, **clt_hooks(n_layers), **common))
    cfgs.append(TrainConfig(architecture="jumprelu", d_sae=24, lr=3e-3, **clt_hooks(n_layers), **common))
    return cfgs


def test_exported_transcoders_load_in_saelens_with_the_same_output(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    saes = train(None, tc_configs(), PairStore(batch_size_tokens=64), tmp_path / "run", progress=False)
    x = torch.randn(50, 16)
    for name, sae in saes.items():
        if isinstance(sae, CrossLayerTranscoder):
            continue
        folder = tmp_path / "run" / name
        assert sae.cfg.metadata.hook_name_out.endswith("hook_mlp_out")
        assert sae.cfg.metadata.hook_name.endswith("mlp.hook_in")
        ours = SAE.load_from_disk(folder)
        if sae.cfg.architecture.startswith("topk"):  # SAELens has no TopK transcoder class: nnsae's own
            assert sae.cfg.architecture in ("topk_transcoder", "topk_skip_transcoder")
            continue
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        assert type(theirs).__name__.lower().replace("skip", "").endswith("transcoder")
        assert theirs.cfg.metadata.hook_name_out == sae.cfg.metadata.hook_name_out
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)


def test_trained_transcoders_equal_the_trained_math_and_load_as_sets(tmp_path):
    """The exported TopK transcoder (norms folded) reconstructs exactly what the training forward did; the folders
    of a run's layers load as one nnsae.circuits TranscoderSet."""
    cfg = TrainConfig(architecture="topk", k=3, d_sae=32, hook=IN, hook_out=OUT, dtype="float64",
                      training_tokens=64 * 3).resolve(16, 64)
    model = make_training_sae(cfg, 16, 16)
    with torch.no_grad():
        model.sae.W_dec.mul_(torch.rand(32, 1, dtype=torch.float64) + 0.5)  # norms ≠ 1: the fold matters
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        trained = model(x, StepContext(target=torch.zeros_like(x))).x_hat
    torch.testing.assert_close(model.export().reconstruct(x), trained, rtol=1e-10, atol=1e-12)

    cfgs = [TrainConfig(architecture="topk", k=3, d_sae=32, hook=f"blocks.{i}.mlp.hook_in",
                        hook_out=f"blocks.{i}.hook_mlp_out", training_tokens=64 * 4, eval_every=0) for i in range(2)]
    saes = train(None, cfgs, PairStore(batch_size_tokens=64), tmp_path / "run", progress=False)
    tcs = load_transcoders(tmp_path / "run")
    assert isinstance(tcs, TranscoderSet) and tcs.n_layers == 2 and tcs[0].activation == "topk"
    x = torch.randn(20, 16)
    for i, sae in enumerate(saes.values()):
        torch.testing.assert_close(tcs[i](x), sae.reconstruct(x), rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full = train(None, tc_configs(checkpoint_every_tokens=64 * 4), PairStore(batch_size_tokens=64),
                 tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(None, tc_configs(checkpoint_every_tokens=64 * 4), PairStore(batch_size_tokens=64, interrupt_at=7),
              tmp_path / "resumed", progress=False)
    resumed = train(None, tc_configs(checkpoint_every_tokens=64 * 4), PairStore(batch_size_tokens=64),
                    tmp_path / "resumed", resume=True, progress=False)
    assert set(full) == set(resumed)
    for name in full:
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        metrics = [(tmp_path / run / name / "metrics.jsonl").read_text() for run in ("full", "resumed")]
        strip = [[{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                  for line in m.splitlines()] for m in metrics]
        assert strip[0] == strip[1]
    clt_folder = next(p for p in (tmp_path / "resumed").iterdir() if p.name.startswith("clt-") and "topk" in p.name)
    assert yaml.safe_load((clt_folder / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"
    assert load_file(clt_folder / "sparsity.safetensors")["sparsity"].shape == (2, 24)


def test_transcoder_config_checks():
    with pytest.raises(ValueError, match="hook_out"):
        TrainConfig(architecture="topk", hook=IN, skip_connection=True)
    with pytest.raises(ValueError, match="Transcoders train with"):
        TrainConfig(architecture="gated", hook=IN, hook_out=OUT)
    assert TrainConfig(architecture="topk", hook=IN, hook_out=OUT).apply_b_dec_to_input is False


def test_cli_trains_per_layer_and_cross_layer_transcoders(tmp_path, capsys):
    from nnsae.cli import main
    from tests.test_harvest import TEXTS

    model_dir, data = tmp_path / "tiny-llama", tmp_path / "data.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data.write_text("\n".join(f'{{"text": "{t}"}}' for t in TEXTS * 4))
    main(["train", "--model", str(model_dir), "--transcoder", "--clt", "--layers", "0-1", "--dataset", str(data),
          "--context-size", "32", "--arch", "topk", "--k", "4", "--expansion", "2", "--tokens", "1024",
          "--batch-size-tokens", "128", "--out", str(tmp_path / "runs")])
    written = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("Wrote")]
    assert len(written) == 3
    for layer, folder in enumerate(written[:2]):
        sae = SAE.load_from_disk(folder)
        assert sae.cfg.architecture == "topk_transcoder" and sae.cfg.k == 4 and sae.cfg.d_sae == 128
        assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (
            f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
        assert sae.cfg.metadata.hf_hook_name_out == f"model.layers.{layer}.mlp.output"
    clt = load_transcoders(written[2])
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 2 and clt.activation == "topk" and clt.k == 4


def test_ce_evaluation_during_training_replaces_the_mlp_output(tmp_path):
    """The CE loss logged for a transcoder equals the model's CE with the MLP's output replaced by the transcoder's
    reconstruction of the MLP's input (plain torch forward hooks; special tokens keep theirs, as SAELens' splice
    with exclude_special_tokens), on the same held-out tokens."""
    from tests.test_harvest import TEXTS

    model = tiny_model("llama")
    store = ActivationStore(model, [IN, OUT], TEXTS * 4, tokenizer=tiny_tokenizer(), context_size=32,
                            batch_size_tokens=64, store_batch_size_prompts=2, n_batches_in_buffer=4,
                            eval_dataset=TEXTS[::-1])
    cfg = TrainConfig(architecture="topk", k=4, d_sae=64, hook=IN, hook_out=OUT, training_tokens=64 * 4,
                      eval_every=4, n_eval_batches=1)
    sae = next(iter(train(model, cfg, store, tmp_path / "run", progress=False).values()))
    record = [json.loads(line) for line in
              open(next((tmp_path / "run").glob("*/metrics.jsonl")))][-1]
    tokens = store.held_out_batches(1)[0]
    special = torch.isin(tokens, torch.tensor([0, 1, 2]))[..., None]  # PAD, BOS, EOS keep the true MLP output
    handle = model.model.layers[0].mlp.register_forward_hook(
        lambda m, i, o: torch.where(special, o, sae.reconstruct(i[0])))
    with torch.no_grad():
        logits = model(tokens).logits
    handle.remove()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    keep = ~special[:, :-1].flatten()  # and are left out of the mean
    assert record["model_performance_preservation/ce_loss_with_sae"] == pytest.approx(float(ce[keep].mean()),
                                                                                      rel=1e-5)


def ddp_configs() -> list[TrainConfig]:
    common = dict(dtype="float64", training_tokens=48 * 2 * 8, dead_feature_window=3, log_every=4, eval_every=0)
    return [TrainConfig(architecture="batchtopk", k=2.5, d_sae=24, hook=IN, hook_out=OUT, skip_connection=True,
                        **common),
            TrainConfig(architecture="topk", k=3, d_sae=16, **clt_hooks(2), **common),
            TrainConfig(architecture="jumprelu", d_sae=16, lr=3e-3, **clt_hooks(2), **common)]


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train(None, ddp_configs(), PairStore(batch_size_tokens=48), out, progress=False)
    finally:
        dist.destroy_process_group()


def test_data_parallel_transcoders_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2,
                       start_method="fork", join=True)
    single = train(None, ddp_configs(), PairStore(batch_size_tokens=96), tmp_path / "single", progress=False)
    for name, trained in single.items():
        if isinstance(trained, CrossLayerTranscoder):
            other = load_transcoders(tmp_path / "ddp" / name, dtype=torch.float64)
            pairs = [(other.W_enc, trained.W_enc), (other.b_dec, trained.b_dec), (other.W_dec[0], trained.W_dec[0])]
        else:
            other = SAE.load_from_disk(tmp_path / "ddp" / name, dtype="float64")
            pairs = [(other.state_dict()[k], v) for k, v in trained.state_dict().items()]
        for a, b in pairs:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("arch,skip", [("topk", True), ("jumprelu", True), ("standard", False), ("batchtopk", True)])
def test_scaled_training_exports_a_transcoder_of_the_raw_activations(arch, skip):
    """expected_average_only_in for transcoders: trained on s_in·x to predict s_out·y, the export on raw x gives the
    trained prediction / s_out (BatchTopK: its threshold inference)."""
    model, _ = make_transcoder(arch, skip)
    s_in, s_out = 3.0, 0.25
    x = torch.randn(N, D, dtype=torch.float64)
    with torch.no_grad():
        if arch == "batchtopk":
            model.topk_threshold.fill_(0.4)
            f = model.encode_with_threshold(x * s_in)
            sae = model.sae
            trained = (f / sae.W_dec.norm(dim=1)) @ sae.W_dec + sae.b_dec + (x * s_in) @ sae.W_skip.T
        else:
            ctx = StepContext(coefficients={"l1": 0.0, "l0": 0.0}, target=torch.zeros_like(x))
            trained = model(x * s_in, ctx).x_hat
    torch.testing.assert_close(model.export(s_in, s_out).reconstruct(x), trained / s_out, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_scaled_clt_training_exports_a_clt_of_the_raw_activations(arch):
    n = 3
    model, _ = make_clt(arch, n)
    s_in, s_out = [2.0, 0.5, 3.0], [0.25, 4.0, 1.5]
    x = torch.randn(N, n, D, dtype=torch.float64)
    scale = lambda s: torch.tensor(s, dtype=torch.float64)[None, :, None]  # noqa: E731
    with torch.no_grad():
        ctx = StepContext(coefficients={"l0": 0.0}, target=torch.zeros_like(x))
        trained = model(x * scale(s_in), ctx).x_hat.view(N, n, D) / scale(s_out)
    clt = model.export(s_in, s_out)
    torch.testing.assert_close(clt(x.transpose(0, 1)).transpose(0, 1), trained, rtol=1e-9, atol=1e-10)


def test_trainer_scales_transcoder_inputs_and_outputs(tmp_path):
    """With expected_average_only_in, each hook gets its own factor √d / mean‖·‖ over the first batches (a CLT: one
    per layer and side), and the saved transcoder works on raw activations."""
    from nnsae.training.trainer import Trainer

    common = dict(normalize_activations="expected_average_only_in", n_batches_for_norm_estimate=2, eval_every=0,
                  training_tokens=64 * 30, log_every=30, lr=1e-2)
    cfgs = [TrainConfig(architecture="topk", k=4, d_sae=32, hook=IN, hook_out=OUT, name="tc", **common),
            TrainConfig(architecture="topk", k=4, d_sae=32, **clt_hooks(2), name="clt", **common)]
    store = PairStore(batch_size_tokens=64)
    trainer = Trainer(None, cfgs, store, tmp_path / "run", progress=False)
    saes = trainer.run()
    first = [store.global_batch(t) for t in (0, 1)]

    def factor(hook: str) -> float:
        return 16 ** 0.5 / float(torch.cat([b[hook] for b in first]).double().norm(dim=-1).mean())

    tc, clt = trainer.runs
    assert tc.scaling_factor == pytest.approx(factor(IN)) and tc.output_scaling_factor == pytest.approx(factor(OUT))
    assert clt.scaling_factor == pytest.approx([factor(h) for h in cfgs[1].hook])
    assert clt.output_scaling_factor == pytest.approx([factor(h) for h in cfgs[1].hook_out])
    batch = store.global_batch(10_000)  # fresh data, raw scale
    x, y = batch[IN].double(), batch[OUT].double()
    with torch.no_grad():
        ev = 1 - (saes["tc"].to(dtype=torch.float64).reconstruct(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert float(ev) > 0.3
