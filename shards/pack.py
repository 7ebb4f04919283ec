"""Script form of `dlscale pack`: DeepLense .npy folders -> WebDataset shards + manifest.

    python shards/pack.py dataset --out shards/common                       # common test (no/sphere/vort)
    python shards/pack.py Model_I --out shards/model_i --workers 4          # Model_I + Model_I_test beside it
"""
import sys

from dlscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
