"""Run several ``hypernorm train`` command lines in one torchrun launch (one process-group start-up for all).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/engine/ddp_driver.py '[["train", ...], ...]'
"""
import json
import sys

import torch.distributed as dist

from hypernorm.cli import main

if __name__ == "__main__":
    dist.init_process_group("gloo")  # train() joins it and leaves it open
    try:
        for argv in json.loads(sys.argv[1]):
            code = main(argv)
            if code:
                sys.exit(code)
    finally:
        dist.destroy_process_group()
