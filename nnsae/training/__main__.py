"""`python -m nnsae.training ...` is `nnsae train ...` (handy under `torchrun --nproc_per_node N -m nnsae.training`)."""

import sys

from nnsae.cli import main

main(["train", *sys.argv[1:]])
