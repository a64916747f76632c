"""`python -m fastrft ...`, and so `torchrun --nproc-per-node N -m fastrft train ...`: the command line."""
import sys

from fastrft.cli import main

sys.exit(main())
