"""`python -m dlscale.train ...` (and `torchrun ... -m dlscale.train ...`): the same as `dlscale train`."""
import sys

from dlscale.train import main

sys.exit(main())
