"""Training stages on DeepSpeed: `run(config)` trains one stage; `main(argv)` is `dlscale train`."""
from dlscale.train.engine import evaluate_run, run
from dlscale.train.cli import eval_main, main

__all__ = ["run", "evaluate_run", "main", "eval_main"]
