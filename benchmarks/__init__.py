"""Ratio benchmarks, one script per capability (`python -m benchmarks.run`)."""

import os

# Benchmark processes are nnsae's own: they keep freed heap memory as the CLI does (see nnsae.harvest).
os.environ.setdefault("NNSAE_KEEP_FREED_HEAP", "1")
