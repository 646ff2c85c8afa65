"""`python -m nnsae.train ...` is `nnsae train ...` (handy under `torchrun --nproc_per_node N -m nnsae.train`)."""

import sys

from nnsae.cli import main

main(["train", *sys.argv[1:]])
