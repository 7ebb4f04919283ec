"""Ray Tune sweep of the multi-task loss weighting; the same as `dlscale tune` (all logic in dlscale/sweep/).

    python tune/sweep.py --data shards/ --out sweeps/weighting [--config my_sweep.yaml] [--trials 24]
    python tune/sweep.py --data shards/ --out sweeps/w --address auto --workers-per-trial 4 --gpus-per-trial 4
    python tune/sweep.py --out sweeps/weighting --resume
"""
import sys

from dlscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
