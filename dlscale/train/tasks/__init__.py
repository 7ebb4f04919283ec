"""Registered training tasks: each is one self-contained part (head, outputs, loss, batch needs, evaluation)."""
from dlscale.train.tasks.base import TASKS, Task, TaskContext, register_task, task_class, task_options
from dlscale.train.tasks import supervised  # noqa: F401  (registers recon, classification, regression)
from dlscale.train.tasks import mae, contrastive  # noqa: F401,E401  (registers mae, contrastive)
from dlscale.train.tasks import adaptation  # noqa: F401  (registers dann, coral, mmd, adda, sinkhorn)
from dlscale.train.tasks import selftraining  # noqa: F401  (registers selftrain)
from dlscale.train.tasks import infomax  # noqa: F401  (registers shot)
from dlscale.train.tasks import randomisation  # noqa: F401  (registers instrument)
from dlscale.train.tasks import noisematch  # noqa: F401  (registers noisematch)
from dlscale.train.tasks import superres  # noqa: F401  (registers superres)
from dlscale.train.tasks import unlabelled  # noqa: F401  (registers recon_unlabelled, contrastive_unlabelled)

__all__ = ["TASKS", "Task", "TaskContext", "register_task", "task_class", "task_options"]
