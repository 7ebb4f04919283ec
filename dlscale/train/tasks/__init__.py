"""Registered training tasks: each is one self-contained part (head, outputs, loss, batch needs, evaluation)."""
from dlscale.train.tasks.base import TASKS, Task, TaskContext, register_task, task_class, task_options
from dlscale.train.tasks import supervised  # noqa: F401  (registers recon, classification, regression)

__all__ = ["TASKS", "Task", "TaskContext", "register_task", "task_class", "task_options"]
