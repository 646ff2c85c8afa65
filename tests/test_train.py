"""Training: losses and gradients against formulas written here from the SAELens 6 spec, the sparse kernels against
dense autograd, schedules against torch's own schedulers, short trainings, export, outputs and config errors."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from nnsae import SAE
from nnsae.rundir import RunLocked
from nnsae.training import TrainConfig, TrainingDiverged, make_training_sae, train
from nnsae.training import sparse
from nnsae.training.base import StepContext
from nnsae.training.schedules import coefficient_at, lr_at
from tests.test_train_store import FakeStore

HOOK = "blocks.0.hook_resid_post"
N, D, S = 24, 8, 40  # tokens, d_in, d_sae of the formula checks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny problems: one thread is faster, and avoids oversubscription when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(cfg: TrainConfig, d_in: int = D, batch: int = N, seed: int = 1):
    model = make_training_sae(cfg.resolve(d_in, batch), d_in)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if hasattr(model.sae, "threshold"):
            model.sae.threshold.copy_(0.3 * torch.rand(model.sae.threshold.shape, generator=g, dtype=torch.float64))
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("sae."): p.grad.clone() for n, p in model.named_parameters()}


def rect(u):
    return ((u > -0.5) & (u < 0.5)).double()


# ---- independent reference formulas (dense, float64) ----------------------------------------------------------------

def reference(cfg: TrainConfig, p: dict[str, torch.Tensor], x: torch.Tensor, dead: torch.Tensor,
              coef: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(losses, extra gradients not given by autograd) for leaf tensors p with requires_grad."""
    arch = cfg.architecture
    x_in = x - p["b_dec"] if cfg.apply_b_dec_to_input else x
    n = p["W_dec"].norm(dim=1)
    losses: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    mse = lambda a, b: ((a - b) ** 2).sum(-1).mean()  # noqa: E731
    if arch == "standard":
        f = torch.relu(x_in @ p["W_enc"] + p["b_enc"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        losses["mse_loss"] = mse(x_hat, x)
        losses["l1_loss"] = coef * (f * n).abs().sum(-1).mean()
    elif arch == "gated":
        pi = x_in @ p["W_enc"] + p["b_gate"]
        mag = torch.relu(x_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"])
        f = (pi > 0).double() * mag
        x_hat = f @ p["W_dec"] + p["b_dec"]
        losses["mse_loss"] = mse(x_hat, x)
        losses["l1_loss"] = coef * (torch.relu(pi) * n).sum(-1).mean()
        losses["auxiliary_reconstruction_loss"] = mse(torch.relu(pi) @ p["W_dec"] + p["b_dec"], x)
    elif arch == "jumprelu":
        theta, eps = p["threshold"], cfg.jumprelu_bandwidth
        z = x_in @ p["W_enc"] + p["b_enc"]
        mask = (z > theta.detach()).double()
        f = z * mask  # ∂f/∂z = 1[z > θ]; θ's pseudo-gradient is added by hand below
        f.retain_grad()
        x_hat = f @ p["W_dec"] + p["b_dec"]
        losses["mse_loss"] = mse(x_hat, x)
        u = (z.detach() - theta.detach()) / eps
        if cfg.jumprelu_sparsity_loss_mode == "tanh":
            losses["l0_loss"] = coef * torch.tanh(cfg.jumprelu_tanh_scale * f * n).sum(-1).mean()
            extra["threshold_step"] = torch.zeros_like(theta)
        else:
            losses["l0_loss"] = coef * mask.sum(-1).mean()
            # d/dθ of c·mean_b Σ H(z−θ) with the rectangle pseudo-derivative −(1/ε) rect(u)
            extra["threshold_step"] = -(coef / x.shape[0]) * (rect(u) / eps).sum(0)
        extra["_f"], extra["_u"] = f, u
    else:
        h = x_in @ p["W_enc"] + p["b_enc"]
        if cfg.rescale_acts_by_decoder_norm:
            h = h * n
        if arch == "topk":
            idx = torch.topk(h, cfg.k, dim=-1).indices
            f = torch.zeros_like(h).scatter(1, idx, torch.relu(h.gather(1, idx)))
        elif arch == "abstopk":
            idx = torch.topk(h.abs(), cfg.k, dim=-1).indices
            f = torch.zeros_like(h).scatter(1, idx, h.gather(1, idx))
        else:
            a = torch.relu(h).flatten()
            v, i = torch.topk(a, int(cfg.k * x.shape[0]))
            f = torch.zeros_like(a).scatter(0, i, v).view_as(h)

        def dec(acts, rows=slice(None)):
            W = p["W_dec"][rows]
            return (acts * (1 / n[rows]) if cfg.rescale_acts_by_decoder_norm else acts) @ W

        x_hat = dec(f) + p["b_dec"]
        losses["mse_loss"] = mse(x_hat, x)
        partials = []
        if arch == "matryoshka_batchtopk":
            widths = cfg.resolve(D, N).matryoshka_widths
            acc, lo = p["b_dec"], 0
            for w in widths:
                acc = acc + dec(f[:, lo:w], slice(lo, w))
                partials.append((lo, w, acc))
                lo = w
            for lo, w, part in partials[:-1]:
                losses[f"inner_mse_loss_{w}"] = mse(part, x)
        d_in = x.shape[1]

        def aux_term(lo, hi, residual):
            dead_part = dead[lo:hi]
            n_dead = int(dead_part.sum())
            if n_dead == 0:
                return 0.0
            k_aux = d_in // 2
            scale = min(n_dead / k_aux, 1.0)
            hp = h[:, lo:hi]
            key = torch.where(dead_part[None], hp.abs() if arch == "abstopk" else hp, -torch.inf)
            idx = torch.topk(key, min(k_aux, n_dead), dim=-1).indices
            acts = torch.zeros_like(hp).scatter(1, idx, hp.gather(1, idx))
            return scale * mse(dec(acts, slice(lo, hi)), residual.detach())

        if arch == "matryoshka_batchtopk" and cfg.use_matryoshka_aux_loss:
            aux = sum(aux_term(lo, w, x - part) for lo, w, part in partials)
        else:
            aux = aux_term(0, None, x - x_hat)
        losses["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * aux
    return losses, extra


FORMULA_CASES = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("gated", {}),
    ("jumprelu", {}), ("jumprelu", {"jumprelu_sparsity_loss_mode": "tanh"}),
    ("topk", {}), ("topk", {"rescale_acts_by_decoder_norm": False}), ("topk", {"apply_b_dec_to_input": False}),
    ("abstopk", {}), ("batchtopk", {"k": 2.5}), ("batchtopk", {"k": 2.5, "rescale_acts_by_decoder_norm": False}),
    ("matryoshka_batchtopk", {"k": 2.5, "matryoshka_widths": [8, 20]}),
    ("matryoshka_batchtopk", {"k": 2.5, "matryoshka_widths": [8, 20], "use_matryoshka_aux_loss": True}),
]


@pytest.mark.parametrize("sparse_kernels", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("arch,overrides", FORMULA_CASES, ids=[f"{a}-{'-'.join(o) or 'default'}" for a, o in
                                                                FORMULA_CASES])
def test_losses_and_gradients_match_the_formulas(arch, overrides, sparse_kernels):
    overrides = dict(overrides)
    cfg = TrainConfig(architecture=arch, d_sae=S, k=overrides.pop("k", 3), dtype="float64",
                      sparse_kernels=sparse_kernels, training_tokens=10 * N, **overrides)
    model = randomized(cfg)
    if arch in ("standard", "gated", "jumprelu") and sparse_kernels:
        model.density.fill_(0.0)  # take the sparse path (it is exact at any density)
    g = torch.Generator().manual_seed(5)
    x = 1.5 * torch.randn(N, D, generator=g, dtype=torch.float64)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=g)[:S // 3]] = True
    coef = 0.7
    out = model(x, StepContext(coefficients={"l1": coef, "l0": coef}, dead_mask=dead))
    out.loss.backward()
    got = grads(model)

    p = {name: t.detach().clone().requires_grad_(True) for name, t in got.items()}
    with torch.no_grad():
        for name in p:
            p[name].copy_(dict(model.sae.named_parameters())[name])
    ref_losses, extra = reference(model.cfg, p, x, dead, coef)
    assert set(out.losses) == set(ref_losses)
    for name, value in ref_losses.items():
        assert float(out.losses[name].detach()) == pytest.approx(float(value.detach()), rel=1e-10, abs=1e-12), name
        assert float(value.detach()) != 0, f"{name} is 0: the check would be vacuous"
    sum(ref_losses.values()).backward()
    if arch == "jumprelu":
        f, u = extra["_f"], extra["_u"]
        theta = p["threshold"].detach()
        expected_theta = -((theta / cfg.jumprelu_bandwidth) * rect(u) * f.grad).sum(0) + extra["threshold_step"]
        assert expected_theta.abs().sum() > 0
        torch.testing.assert_close(got.pop("threshold"), expected_theta, rtol=1e-10, atol=1e-12)
        p.pop("threshold")
    for name, leaf in p.items():
        torch.testing.assert_close(got[name], leaf.grad, rtol=1e-10, atol=1e-12, msg=name)
    # firing statistics of the step
    assert out.fired.shape == (S,) and float(out.l0) == pytest.approx(float(out.fired.sum()) / N)


def test_jumprelu_quadratic_and_pre_act_losses():
    cfg = TrainConfig(architecture="jumprelu", d_sae=S, dtype="float64", jumprelu_sparsity_loss_mode="quadratic",
                      target_l0=5.0, pre_act_loss_coefficient=0.3, training_tokens=10 * N)
    model = randomized(cfg)
    model.density.fill_(0.0)  # the pre-activation loss needs every entry: the dense path is kept
    x = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dead = torch.arange(S) % 4 == 0
    out = model(x, StepContext(coefficients={"l0": 0.5}, dead_mask=dead))
    sae = model.sae
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    l0 = (z > sae.threshold).double().sum(-1)
    expected = float((0.5 * 2 / 5 * (l0 - 5) ** 2).mean())
    assert float(out.losses["l0_loss"].detach()) == pytest.approx(expected, rel=1e-12)
    pre = (torch.relu(sae.threshold - z) * dead.double() * sae.W_dec.norm(dim=1)).sum(-1).mean() * 0.3
    assert float(out.losses["pre_act_loss"].detach()) == pytest.approx(float(pre.detach()), rel=1e-12)
    # the sparse path gives the same quadratic loss and gradients as the dense one
    grads_by_path = []
    for density in (1.0, 0.0):
        model = randomized(TrainConfig(**{**cfg.to_dict(), "pre_act_loss_coefficient": None}))
        model.density.fill_(density)
        out = model(x, StepContext(coefficients={"l0": 0.5}, dead_mask=dead))
        out.loss.backward()
        grads_by_path.append((float(out.loss.detach()), grads(model)))
    assert grads_by_path[0][0] == pytest.approx(grads_by_path[1][0], rel=1e-12)
    for name, g in grads_by_path[0][1].items():
        torch.testing.assert_close(grads_by_path[1][1][name], g, rtol=1e-10, atol=1e-12)


def test_jumprelu_threshold_is_projected_non_negative():
    model = randomized(TrainConfig(architecture="jumprelu", d_sae=S, dtype="float64", training_tokens=10 * N))
    with torch.no_grad():
        model.sae.threshold[:5] = -1.0
    model.before_step()
    assert float(model.sae.threshold.detach().min()) >= 0


# ---- sparse kernels against dense autograd ---------------------------------------------------------------------------

def test_sparse_kernels_equal_dense_autograd_including_input_gradient():
    g = torch.Generator().manual_seed(0)
    n_rows, d, s, k = 50, 12, 70, 6
    x = torch.randn(n_rows, d, generator=g, dtype=torch.float64, requires_grad=True)
    b_dec, b_enc = (torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True) for m in (d, s))
    W_enc = torch.randn(d, s, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(s, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n_rows, d, generator=g, dtype=torch.float64)
    z = ((x - b_dec) @ W_enc + b_enc).detach()
    for pattern in (sparse.Pattern.from_topk(torch.topk(z, k).indices, s),  # fixed k per row
                    sparse.Pattern.from_flat(torch.sort(torch.topk(z.flatten(), 200).indices).values, n_rows, s)):
        values = z[pattern.rows, pattern.cols]
        pre = sparse.preacts(x, b_dec, W_enc, b_enc, values, pattern)
        out = sparse.decode(W_dec, torch.tanh(pre), pattern)
        loss = ((out - target) ** 2).sum()
        fast = torch.autograd.grad(loss, [x, b_dec, W_enc, b_enc, W_dec])
        dense_pre = ((x - b_dec) @ W_enc + b_enc)[pattern.rows, pattern.cols]
        dense_out = sparse.to_dense(torch.tanh(dense_pre), pattern) @ W_dec
        assert torch.allclose(out, dense_out, rtol=1e-12, atol=1e-12)
        slow = torch.autograd.grad(((dense_out - target) ** 2).sum(), [x, b_dec, W_enc, b_enc, W_dec])
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch,k", [("topk", 3), ("abstopk", 3), ("batchtopk", 2.5), ("jumprelu", 3),
                                    ("standard", 3), ("gated", 3)])
def test_bf16_autocast_selects_like_float32(arch, k):
    # bf16 only proposes candidates (TopK family) or a widened pattern (ReLU family); exact float values decide,
    # so the selected latents, losses and gradients match float32 up to float rounding.
    cfg = TrainConfig(architecture=arch, d_sae=S, k=k, training_tokens=10 * N)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    outs = []
    for autocast in (False, True):
        model = randomized(TrainConfig(**{**cfg.to_dict(), "autocast": autocast}), seed=4)
        with torch.no_grad():
            model.sae.W_enc.mul_(0.2)
        if hasattr(model, "density"):
            model.density.fill_(0.0)  # the sparse path
        out = model(x, StepContext(coefficients={"l1": 0.1, "l0": 0.1}))
        out.loss.backward()
        outs.append((out, grads(model)))
    (a, ga), (b, gb) = outs
    assert torch.equal(a.fired, b.fired)
    assert float(b.loss.detach()) == pytest.approx(float(a.loss.detach()), rel=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-5)


# ---- schedules ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler,warm,decay,cycles", [
    ("constant", 0, 0, 1), ("constant", 7, 11, 1), ("cosineannealing", 5, 0, 1), ("cosineannealing", 4, 9, 1),
    ("cosineannealingwarmrestarts", 3, 5, 3), ("constant", 1, 0, 1),
])
def test_lr_schedule_matches_torch_sequential_lr(scheduler, warm, decay, cycles):
    from torch.optim import lr_scheduler as sch

    total, lr, lr_end = 60, 1e-3, 2e-4
    cfg = TrainConfig(lr=lr, lr_end=lr_end, lr_scheduler=scheduler, lr_warm_up_steps=warm, lr_decay_steps=decay,
                      n_restart_cycles=cycles, training_tokens=total * 10, d_sae=S, k=3).resolve(D, 10)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    main_steps = total - warm - decay
    main = {"constant": lambda: sch.LambdaLR(opt, lambda s: 1.0),
            "cosineannealing": lambda: sch.CosineAnnealingLR(opt, T_max=main_steps, eta_min=lr_end),
            "cosineannealingwarmrestarts": lambda: sch.CosineAnnealingWarmRestarts(
                opt, T_0=main_steps // cycles, eta_min=lr_end)}[scheduler]()
    schedulers, milestones = [], []
    if warm > 0:
        schedulers.append(sch.LinearLR(opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1))
        milestones.append(warm)
    schedulers.append(main)
    if decay > 0:
        start = 1.0 if scheduler == "constant" else lr_end / lr
        schedulers.append(sch.LinearLR(opt, start_factor=start, end_factor=0.0, total_iters=decay))
        milestones.append(total - decay)
    seq = sch.SequentialLR(opt, schedulers=schedulers, milestones=milestones)
    for t in range(total):
        assert lr_at(cfg, t, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), t
        opt.step()
        seq.step()


def test_coefficient_warm_up_is_linear_from_zero():
    assert [coefficient_at(2.0, 4, t) for t in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert coefficient_at(2.0, 0, 0) == 2.0


def test_default_lr_rule():
    from nnsae.training import default_lr

    assert default_lr("topk", 4608, 4096) == pytest.approx(4e-3)
    assert default_lr("batchtopk", 4 * 4608, 4096) == pytest.approx(2e-3)
    assert default_lr("topk", 4608, 4 * 4096) == pytest.approx(8e-3)
    assert default_lr("jumprelu", 4608, 4096) == pytest.approx(3e-4)


# ---- short trainings on the synthetic store -------------------------------------------------------------------------

TRAIN_CASES = {
    "topk": dict(k=3),
    "abstopk": dict(k=3),
    "batchtopk": dict(k=3),
    "matryoshka_batchtopk": dict(k=3, matryoshka_widths=[16, 48]),
    "standard": dict(lr=3e-3, l1_coefficient=0.3, l1_warm_up_steps=20),
    "gated": dict(lr=3e-3, l1_coefficient=0.3, l1_warm_up_steps=20),
    "jumprelu": dict(lr=3e-3, l0_coefficient=0.05, l0_warm_up_steps=20),
}
MSE_FACTOR = 5  # the final MSE is at least this many times below the first step's


@pytest.mark.parametrize("arch", list(TRAIN_CASES))
def test_short_training_reduces_mse(arch, tmp_path):
    store = FakeStore(batch_size_tokens=128)
    cfg = TrainConfig(architecture=arch, d_sae=96, training_tokens=128 * 200, log_every=1, **TRAIN_CASES[arch])
    (name, sae), = train(None, cfg, store, tmp_path, progress=False).items()
    assert name == f"{HOOK}-{arch}-96" + ("-k3" if "k" in TRAIN_CASES[arch] else "")
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert last["losses/mse_loss"] * MSE_FACTOR < first["losses/mse_loss"], (first, last)
    if arch in ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk"):
        assert last["metrics/l0"] == pytest.approx(3, abs=0.01)
    # the exported SAE reconstructs held-out data about as well as training did
    x = FakeStore(batch_size_tokens=1024).global_batch(10**6)[HOOK]
    with torch.no_grad():
        ev = 1 - (x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(ev) > last["metrics/explained_variance"] - 0.05 and float(ev) > 0.3


def test_topk_reaches_high_explained_variance(tmp_path):
    store = FakeStore(batch_size_tokens=128)
    cfg = TrainConfig(architecture="topk", d_sae=96, k=3, lr=2e-2, training_tokens=128 * 700, log_every=50)
    (sae,) = train(None, cfg, store, tmp_path, progress=False).values()
    x = FakeStore(batch_size_tokens=2048).global_batch(10**6)[HOOK]
    with torch.no_grad():
        ev = 1 - (x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(ev) > 0.98


# ---- export -------------------------------------------------------------------------------------------------------

def _train_briefly(tmp_path, **kw):
    store = FakeStore(batch_size_tokens=128)
    cfg = TrainConfig(d_sae=96, training_tokens=128 * 30, log_every=10, **kw)
    trainer_models = {}

    trainer_module = importlib.import_module("nnsae.training.trainer")

    original = trainer_module.Trainer._finalize

    def keep(self, run):
        trainer_models[run.name] = run
        return original(self, run)

    trainer_module.Trainer._finalize = keep
    try:
        (name, sae), = train(None, cfg, store, tmp_path, progress=False).items()
    finally:
        trainer_module.Trainer._finalize = original
    return sae, trainer_models[name], tmp_path / name


@pytest.mark.parametrize("arch,kw", [("batchtopk", {"k": 4.0}),
                                     ("batchtopk", {"k": 4.0, "normalize_activations": "expected_average_only_in",
                                                    "n_batches_for_norm_estimate": 3}),
                                     ("batchtopk", {"k": 4.0, "rescale_acts_by_decoder_norm": False}),
                                     ("matryoshka_batchtopk", {"k": 4.0, "matryoshka_widths": [16, 48]})])
def test_batchtopk_exports_as_jumprelu_with_identical_activations(tmp_path, arch, kw):
    sae, run, folder = _train_briefly(tmp_path, architecture=arch, **kw)
    loaded = SAE.load_from_disk(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and loaded.cfg.architecture == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["normalize_activations"] == "none"
    theta = float(run.model.topk_threshold)
    assert theta > 0
    x = FakeStore(batch_size_tokens=256, seed=3).global_batch(0)[HOOK]
    s = run.scaling_factor or 1.0
    # With rescaling, folding the input scale s also divides the decoder norms by s, so the exported latents are
    # the training-time ones divided by s (the same latents fire; SAELens folds the same way).
    expected = run.model.encode_with_threshold(x * s) / (s if run.cfg.rescale_acts_by_decoder_norm else 1.0)
    got = loaded.encode(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got > 0, expected > 0)
    if kw.get("rescale_acts_by_decoder_norm", True):
        torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(96), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,kw", [("topk", {"k": 4}), ("topk", {"k": 4, "rescale_acts_by_decoder_norm": False}),
                                     ("abstopk", {"k": 4}), ("standard", {}), ("gated", {}), ("jumprelu", {}),
                                     ("topk", {"k": 4, "normalize_activations": "expected_average_only_in",
                                               "n_batches_for_norm_estimate": 2})])
def test_export_matches_the_training_forward(tmp_path, arch, kw):
    sae, run, folder = _train_briefly(tmp_path, architecture=arch, **kw)
    loaded = SAE.load_from_disk(folder)
    assert loaded.cfg.architecture == arch
    x = FakeStore(batch_size_tokens=64, seed=4).global_batch(0)[HOOK]
    s = run.scaling_factor or 1.0
    with torch.no_grad():
        expected = run.model(x * s, StepContext(coefficients={"l1": 0.0, "l0": 0.0})).x_hat / s
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if arch in ("topk", "abstopk") and kw.get("rescale_acts_by_decoder_norm", True):
        torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(96), rtol=1e-5, atol=1e-5)
        assert loaded.cfg.rescale_acts_by_decoder_norm is True
    if "normalize_activations" in kw:
        assert loaded.cfg.normalize_activations == "none" and run.scaling_factor is not None


def test_outputs_metadata_and_sparsity(tmp_path):
    sae, run, folder = _train_briefly(tmp_path, architecture="topk", k=4)
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg["metadata"]
    for key, value in FakeStore().metadata(HOOK).items():  # everything the store says
        assert meta[key] == value
    assert meta["training_tokens"] == 128 * 30
    assert meta["l0"] == pytest.approx(4.0, abs=1e-4)
    assert meta["num_dead_features"] == int(run.dead_mask().sum())
    assert meta["training_architecture_details"]["lr"] == run.cfg.lr
    sparsity = load_file(folder / "sparsity.safetensors")["sparsity"]
    expected = torch.log10(run.act_freq_scores / run.n_frac_active_samples + 1e-10)
    torch.testing.assert_close(sparsity, expected)
    assert (folder / "train_config.json").exists() and (folder / "metrics.jsonl").exists()
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["complete"] and not (tmp_path / "checkpoints").exists()
    line = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "tokens", "losses/mse_loss", "losses/auxiliary_reconstruction_loss", "metrics/l0",
                "metrics/explained_variance", "sparsity/dead_fraction", "details/current_learning_rate"):
        assert key in line


def test_exported_files_load_in_saelens_with_identical_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae, run, folder = _train_briefly(tmp_path, architecture="batchtopk", k=4.0)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = FakeStore(batch_size_tokens=64, seed=5).global_batch(0)[HOOK]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)


# ---- several SAEs from one store iteration --------------------------------------------------------------------------

class CountingStore(FakeStore):
    def __init__(self, *a, **kw):
        FakeStore.__init__(self, *a, **kw)
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        return FakeStore.__iter__(self)


def test_several_saes_share_one_store_iteration(tmp_path):
    store = CountingStore(hooks={"a": 16, "b": 24}, batch_size_tokens=64)
    cfgs = [TrainConfig(architecture="topk", hook="a", d_sae=48, k=3, training_tokens=64 * 10),
            TrainConfig(architecture="jumprelu", hook="b", expansion_factor=2, training_tokens=64 * 6),
            TrainConfig(architecture="batchtopk", hook="a", d_sae=48, k=3.0, training_tokens=64 * 10, name="bt")]
    saes = train(None, cfgs, store, tmp_path, progress=False)
    assert store.iterations == 1 and store.pos == 10
    assert set(saes) == {"a-topk-48-k3", "b-jumprelu-48", "bt"}
    assert saes["b-jumprelu-48"].cfg.d_in == 24 and saes["b-jumprelu-48"].cfg.metadata.training_tokens == 64 * 6
    assert saes["bt"].cfg.metadata.hook_name == "a"


# ---- errors -------------------------------------------------------------------------------------------------------

class ExplodingStore(FakeStore):
    def __iter__(self):
        raise AssertionError("the store must not be iterated")


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="known architectures.*'standard'.*'matryoshka_batchtopk'"):
        TrainConfig(architecture="topkk")
    with pytest.raises(ValueError, match="smaller than one batch"):
        train(None, TrainConfig(training_tokens=100, d_sae=64, k=4), ExplodingStore(batch_size_tokens=256), tmp_path)
    with pytest.raises(ValueError, match="not one of the store's hooks"):
        train(None, TrainConfig(hook="nope", d_sae=64, k=4), ExplodingStore(), tmp_path)
    with pytest.raises(ValueError, match="k=100 is larger than d_sae=64"):
        train(None, TrainConfig(d_sae=64), ExplodingStore(), tmp_path)
    with pytest.raises(ValueError, match="integer k"):
        TrainConfig(architecture="topk", k=2.5)
    with pytest.raises(ValueError, match="target_l0"):
        TrainConfig(architecture="jumprelu", jumprelu_sparsity_loss_mode="quadratic")
    with pytest.raises(ValueError, match="strictly increasing"):
        TrainConfig(architecture="matryoshka_batchtopk", matryoshka_widths=[32, 16], d_sae=64, k=4).resolve(32, 64)
    with pytest.raises(ValueError, match="normalize_activations"):
        TrainConfig(normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="exponential")
    with pytest.raises(ValueError, match="same folder"):
        train(None, [TrainConfig(d_sae=64, k=4), TrainConfig(d_sae=64, k=4)], ExplodingStore(), tmp_path)
    with pytest.raises(ValueError, match="'../x' cannot be used as a file name"):
        train(None, TrainConfig(d_sae=64, k=4, name="../x"), ExplodingStore(), tmp_path)
    with pytest.raises(ValueError, match="'checkpoints' is the checkpoints folder"):
        train(None, TrainConfig(d_sae=64, k=4, name="checkpoints"), ExplodingStore(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_out_dir_with_a_different_run_is_refused_before_compute(tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 4)
    train(None, cfg, FakeStore(batch_size_tokens=64), tmp_path, progress=False)
    other = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 4, lr=1e-3)
    with pytest.raises(ValueError, match=r"holds a training run with different settings:\n"
                                         r"  saes\.blocks\.0\.hook_resid_post-topk-48-k3\.lr: 0\.0048.* → 0\.001\n"
                                         r".*\nUse another output directory \(--out\), overwrite=True"):
        train(None, other, ExplodingStore(batch_size_tokens=64), tmp_path)
    with pytest.raises(ValueError, match="finished run.*resume=True"):
        train(None, cfg, ExplodingStore(batch_size_tokens=64), tmp_path)
    again = train(None, cfg, ExplodingStore(batch_size_tokens=64), tmp_path, resume=True)  # loads the finished run
    assert set(again) == {"blocks.0.hook_resid_post-topk-48-k3"}
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match="not empty"):
        train(None, cfg, ExplodingStore(batch_size_tokens=64), other_dir)
    assert os.listdir(other_dir) == ["notes.txt"]  # nothing written into a directory that is not ours


class IdentifiedStore(FakeStore):
    """A store that names the model and data it reads (as `ActivationStore.identity()` does)."""

    def __init__(self, model_fingerprint: str, delay: float = 0.0, **kw):
        super().__init__(**kw)
        self.model_fingerprint, self.delay = model_fingerprint, delay

    def identity(self) -> dict:
        return {"model": self.model_fingerprint, "dataset": "synthetic"}

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


def test_resume_refuses_another_model_and_overwrite_replaces_the_run(tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 4)
    train(None, cfg, IdentifiedStore("a" * 64, batch_size_tokens=64), tmp_path, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["store"] == {"model": "a" * 64, "dataset": "synthetic"}
    with pytest.raises(ValueError, match=r"\n  store\.model: aaaaaaaaaaaa… → bbbbbbbbbbbb…\n"):
        train(None, cfg, IdentifiedStore("b" * 64, batch_size_tokens=64), tmp_path, resume=True)
    (tmp_path / "notes.txt").write_text("mine")
    other = TrainConfig(architecture="topk", d_sae=32, k=3, training_tokens=64 * 4)
    saes = train(None, other, IdentifiedStore("b" * 64, batch_size_tokens=64), tmp_path, progress=False,
                 overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "blocks.0.hook_resid_post-topk-32-k3", "notes.txt",
                                                          "run.json"]
    assert set(saes) == {"blocks.0.hook_resid_post-topk-32-k3"}


def test_a_second_trainer_on_the_same_out_is_refused(tmp_path):
    """A forked trainer holds the lock; a second one is refused with one line naming the directory and the holder;
    once the first is killed, its lock file does not block resuming."""
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 4)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            train(None, cfg, IdentifiedStore("a" * 64, delay=60, batch_size_tokens=64), tmp_path, progress=False)
        finally:
            os._exit(1)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run.json").exists() and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(RunLocked, match=rf"^{tmp_path} is in use: an nnsae training run \(pid {pid} on [^)]*\) "
                                            rf"holds {tmp_path}/\.lock\. Wait for it to finish or use another output "
                                            r"directory\.$"):
            train(None, cfg, ExplodingStore(batch_size_tokens=64), tmp_path, resume=True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    saes = train(None, cfg, IdentifiedStore("a" * 64, batch_size_tokens=64), tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["complete"]
    assert set(saes) == {"blocks.0.hook_resid_post-topk-48-k3"}


class PoisonedStore(FakeStore):
    def __init__(self, bad_batch: int, **kw):
        FakeStore.__init__(self, **kw)
        self.bad_batch = bad_batch

    def global_batch(self, t):
        out = FakeStore.global_batch(self, t)
        if t == self.bad_batch:
            out = {h: torch.full_like(x, float("nan")) for h, x in out.items()}
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 20, checkpoint_every_tokens=64 * 4)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 9 .*last good checkpoint is .*step-8"):
        train(None, cfg, PoisonedStore(bad_batch=9, batch_size_tokens=64), tmp_path, progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-8"]
    assert not (tmp_path / "blocks.0.hook_resid_post-topk-48-k3" / "cfg.json").exists()


def test_batch_top_selection_equals_torch_topk():
    for trial in range(12):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(10, 2_000_000, (1,), generator=g))
        high = n + 5 if trial % 3 else 5000
        m = int(torch.randint(0 if trial % 3 else 1, high, (1,), generator=g))
        flat = torch.randn(n, generator=g) + 2 * float(torch.randn(1, generator=g))
        values, idx = torch.topk(flat, min(m, n))
        assert torch.equal(sparse.top_positive_flat(flat, m), torch.sort(idx[values > 0]).values)


def test_relu_family_switches_to_the_sparse_path_once_sparse(monkeypatch):
    from nnsae.training.jumprelu import JumpReLUTrainingSAE

    cfg = TrainConfig(architecture="jumprelu", d_sae=S, training_tokens=10 * N)
    model = make_training_sae(cfg.resolve(D, N), D)
    calls = []
    original = JumpReLUTrainingSAE._sparse_forward
    monkeypatch.setattr(JumpReLUTrainingSAE, "_sparse_forward",
                        lambda self, x, ctx: calls.append(1) or original(self, x, ctx))
    x = torch.randn(N, D)
    model(x, StepContext(coefficients={"l0": 1.0}))
    assert not calls and float(model.density) > model.SPARSE_MAX_DENSITY  # θ = 0.01: about half the entries
    with torch.no_grad():
        model.sae.threshold.fill_(10.0)
    model(x, StepContext(coefficients={"l0": 1.0}))  # still dense (decided by the previous step), records density
    assert not calls and float(model.density) == 0.0
    model(x, StepContext(coefficients={"l0": 1.0}))
    assert calls == [1]


def test_a_store_that_runs_out_finishes_early_with_a_warning(tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 10)
    with pytest.warns(UserWarning, match="ran out of data.*trained on 320 of 640 tokens"):
        (sae,) = train(None, cfg, FakeStore(batch_size_tokens=64, n_batches=5), tmp_path, progress=False).values()
    assert sae.cfg.metadata.training_tokens == 320


def test_biased_matmul_equals_addmm():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(9, 5, generator=g), torch.randn(5, 11, generator=g), torch.randn(11, generator=g)
    torch.testing.assert_close(sparse.biased_matmul(x, W, b), torch.addmm(b, x, W))


def test_adam_on_latent_major_parameters_updates_as_plain_adam():
    """The trainer's Adam hands latent-major (transposed) parameters to the fused kernel as contiguous views: the
    updates equal torch's plain Adam step for step, and moments saved by plain Adam (the parameter's own shape)
    load and continue identically."""
    from nnsae.training.trainer import _ContiguousAdam

    g = torch.Generator().manual_seed(0)

    def params():
        return [torch.nn.Parameter(torch.randn(7, 5, generator=torch.Generator().manual_seed(1)).t()),
                torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(2)))]

    ours, plain = params(), params()
    assert not ours[0].is_contiguous()
    opt = _ContiguousAdam(ours, lr=1e-2, betas=(0.9, 0.99), fused=True)
    ref = torch.optim.Adam(plain, lr=1e-2, betas=(0.9, 0.99), foreach=False)

    def step(opt, ps, grads):
        for p, grad in zip(ps, grads):
            p.grad = grad.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        grads = [torch.randn(5, 7, generator=g), torch.randn(4, 6, generator=g)]
        step(opt, ours, grads)
        step(ref, plain, grads)
        assert all(p.grad is None for p in ours)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    resumed = _ContiguousAdam(ours, lr=1e-2, betas=(0.9, 0.99), fused=True)
    # plain Adam's moments, in the parameters' own shapes (a copy, as read back from a checkpoint file)
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))
    grads = [torch.randn(5, 7, generator=g), torch.randn(4, 6, generator=g)]
    step(resumed, ours, grads)
    step(ref, plain, grads)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
