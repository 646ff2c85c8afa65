"""A synthetic activation store for the training tests (the ActivationStore interface, no model), and its checks.

Batches are `x = codes @ D + bias + noise`: each token uses `active` of `n_features` unit-norm dictionary atoms
(Zipf-like frequencies, magnitudes in [0.5, 2)). Global batch t is a pure function of (seed, hook, t), so the
position in the data is one integer, and `shard(rank, world_size)` serves rows [rank·b, (rank+1)·b) of the global
batch of `world_size · b` tokens — exactly what one process with batch `world_size · b` sees.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator

import torch


class FakeStore:
    def __init__(self, hooks: dict[str, int] | None = None, batch_size_tokens: int = 256, n_features: int = 24,
                 active: int = 2, noise: float = 0.02, seed: int = 0, n_batches: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.widths = dict(hooks or {"blocks.0.hook_resid_post": 32})
        self.batch_size_tokens = batch_size_tokens
        self.n_features, self.active, self.noise, self.seed = n_features, active, noise, seed
        self.n_batches, self.dtype = n_batches, dtype
        self.rank, self.world_size = 0, 1
        self.pos = 0
        self.dictionaries = {}
        for hook, d in self.widths.items():
            g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(hook.encode()))
            D = torch.randn(n_features, d, generator=g, dtype=torch.float64)
            bias = torch.randn(d, generator=g, dtype=torch.float64) * 0.5
            self.dictionaries[hook] = (D / D.norm(dim=-1, keepdim=True), bias)
        self.probs = 1 / torch.arange(1, n_features + 1, dtype=torch.float64) ** 0.6

    @property
    def hooks(self) -> list[str]:
        return list(self.widths)

    def d_in(self, hook: str) -> int:
        return self.widths[hook]

    def metadata(self, hook: str) -> dict[str, Any]:
        return {"model_name": "fake-model", "hook_name": hook, "hf_hook_name": f"model.{hook}.output",
                "context_size": 128, "prepend_bos": True, "dataset_path": "synthetic", "exclude_special_tokens": False}

    def global_batch(self, t: int) -> dict[str, torch.Tensor]:
        n = self.batch_size_tokens * self.world_size
        out = {}
        for hook, (D, bias) in self.dictionaries.items():
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + t) * 31 + zlib.crc32(hook.encode()) % 31)
            idx = torch.multinomial(self.probs.expand(n, -1), self.active, generator=g)
            mags = 0.5 + 1.5 * torch.rand(n, self.active, generator=g, dtype=torch.float64)
            codes = torch.zeros(n, self.n_features, dtype=torch.float64).scatter_(1, idx, mags)
            x = codes @ D + bias + self.noise * torch.randn(n, D.shape[1], generator=g, dtype=torch.float64)
            out[hook] = x.to(self.dtype)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.n_batches is None or self.pos < self.n_batches:
            t = self.pos
            self.pos += 1
            b = self.batch_size_tokens
            yield {h: x[self.rank * b:(self.rank + 1) * b] for h, x in self.global_batch(t).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "rank": self.rank, "world_size": self.world_size, "check": torch.tensor([self.pos])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert (state["rank"], state["world_size"]) == (self.rank, self.world_size)
        assert int(state["check"][0]) == state["pos"]
        self.pos = state["pos"]

    def shard(self, rank: int, world_size: int) -> FakeStore:
        self.rank, self.world_size = rank, world_size
        return self


def test_fake_store_is_deterministic_resumable_and_shards_the_global_batch():
    store = FakeStore(batch_size_tokens=8)
    it = iter(store)
    first = [next(it) for _ in range(3)]
    state = store.state_dict()
    fourth = next(it)
    again = FakeStore(batch_size_tokens=8)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["blocks.0.hook_resid_post"], fourth["blocks.0.hook_resid_post"])
    whole = FakeStore(batch_size_tokens=16)
    parts = [next(iter(FakeStore(batch_size_tokens=8).shard(r, 2)))["blocks.0.hook_resid_post"] for r in range(2)]
    assert torch.equal(torch.cat(parts), next(iter(whole))["blocks.0.hook_resid_post"])
    assert first[0]["blocks.0.hook_resid_post"].shape == (8, 32)
