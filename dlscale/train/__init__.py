"""Training stages on DeepSpeed: `run(config)` trains one stage; `main(argv)` is `dlscale train`.

The open parts: tasks (`dlscale.train.tasks`), stages (`dlscale.train.stages`) and loss weightings
(`dlscale.train.weighting`) are registries; a launch script can register its own and call `main`.
"""
from dlscale.train.cli import eval_main, main
from dlscale.train.runner import run
from dlscale.train.evaluation import evaluate_run

__all__ = ["run", "evaluate_run", "main", "eval_main"]
