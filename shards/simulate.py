"""Script form of `dlscale simulate`: the built-in lensing simulator -> shards + manifest.

    python shards/simulate.py --preset model_ii --n-per-class 10000 --out shards/sim_ii
"""
import sys

from dlscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
