"""Dashboard build time for 100 features against the extraction pass alone, on SmolLM2-135M (embedded, offline).

Same process, same data, after an untimed warm-up:
1. `nnsae.extract` alone: one model pass over `--tokens` offline tokens, every non-zero activation kept, as
   `dashboard()` runs it;
2. `dashboard(..., from_extraction=...)`: the pages + JSON for 100 features from that extraction (statistics, shard
   scan for quantile samples, logit effects, HTML);
3. the full `dashboard()` call that does both.
The SAE is a random TopK SAE (k=32, 8× expansion) at `blocks.6.hook_resid_post`: weights do not change the work.

Run: `python -m benchmarks.dashboard [--tokens 16384] [--features 100]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, markdown_table


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(n_tokens: int = 16_384, n_features: int = 100, d_sae: int = 4608, k: int = 32) -> str:
    import nnsae
    from nnsae import SAE, SAEConfig
    from nnsae.dashboards import dashboard
    from nnsae.extract import extract

    model, tokenizer = nnsae.load_smollm2()
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=model.config.hidden_size, d_sae=d_sae, architecture="topk", k=k,
                                    metadata={"hook_name": "blocks.6.hook_resid_post", "model_name": "smollm2"}))
    saes = {"layer6": sae}
    common = dict(tokenizer=tokenizer, context_size=128, progress=False)
    with tempfile.TemporaryDirectory(prefix="nnsae-bench-dash-") as tmp:
        tmp = Path(tmp)
        # warm-up (first-call costs of torch/nnsight kernels and of the page code), not timed
        dashboard(model, saes, "offline", tmp / "warmup", features=range(5), n_tokens=1024, **common)
        t_extract, _ = _timed(lambda: extract(model, saes, "offline", tmp / "extraction", n_tokens=n_tokens,
                                              top_k=None, n_top_contexts=20, context_window=16, **common))
        t_pages, _ = _timed(lambda: dashboard(model, saes, out=tmp / "pages", features=range(n_features),
                                              from_extraction=tmp / "extraction", **common))
        t_full, site = _timed(lambda: dashboard(model, saes, "offline", tmp / "full", features=range(n_features),
                                                n_tokens=n_tokens, **common))
        n_pages = len(list((tmp / "full" / "features").glob("*.html")))
        size = sum(p.stat().st_size for p in (tmp / "full").rglob("*") if p.is_file() and "extraction" not in p.parts)
    rows = [
        ["extraction pass alone (`nnsae.extract`)", f"{t_extract:.2f}", "1.00×", f"{n_tokens / t_extract:,.0f} tok/s"],
        [f"pages + JSON for {n_features} features from that extraction", f"{t_pages:.2f}",
         f"{t_pages / t_extract:.2f}×", f"{t_pages / n_features * 1000:.1f} ms/feature"],
        ["full `dashboard()` (extraction + pages)", f"{t_full:.2f}", f"{t_full / t_extract:.2f}×",
         f"{n_pages} pages, {size / 1e6:.1f} MB"],
    ]
    header = ["step", "seconds", "× extraction", "rate"]
    return (f"Dashboard build, SmolLM2-135M, {n_tokens:,} offline tokens, TopK SAE d_sae {d_sae} (k={k}) at "
            f"blocks.6.hook_resid_post, {n_features} features (float32, CPU; {machine_line()})\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--d-sae", type=int, default=4608)
    args = parser.parse_args()
    print(run(args.tokens, args.features, args.d_sae))


if __name__ == "__main__":
    main()
