"""The demo's dashboard shows live, readable features: the strongest on its prompt and the most frequent non-dense
ones, never dead ones."""

import torch

from nnsae.demo import _interesting_features


def test_demo_picks_live_features_strongest_and_frequent():
    density = [0.0] * 20
    density[3], density[5], density[7], density[9], density[11] = 0.5, 0.05, 0.02, 0.01, 0.001  # 3 is dense
    acts = torch.zeros(4, 20)
    acts[2, 11], acts[1, 0] = 9.0, 5.0  # feature 0 fires on the prompt but never in the data (dead): skipped
    chosen = _interesting_features(density, acts, 4)
    assert len(chosen) == 4 and all(density[f] > 0 for f in chosen)
    assert 11 in chosen  # strongest on the prompt
    assert {5, 7} <= set(chosen)  # most frequent below 10% density
    assert chosen == sorted(chosen)
