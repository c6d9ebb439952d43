"""Run several ``hypernorm train`` command lines in one torchrun launch (one process-group start-up for all).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/engine/ddp_driver.py '[["train", ...], ...]'

The models train in float64 (the default dtype), as the one-process runs they are compared with do: float32
kernels round differently with the data split (up to 4e-5 on AVX2-only CPUs after one epoch), float64's rounding
stays far below any tolerance that still catches a wrong algorithm.
"""
import json
import sys

import torch
import torch.distributed as dist

from hypernorm.cli import main
from hypernorm.engine.distributed import destroy_process_group

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")  # train() joins it and leaves it open
    try:
        for argv in json.loads(sys.argv[1]):
            code = main(argv)
            if code:
                sys.exit(code)
    finally:
        destroy_process_group()
