"""Ray Tune sweeps of the training config (the multi-task loss weighting first): spec (the sweep file),
execution (Ray), results (tables, Pareto figure, best config), cli (`dlscale tune`)."""
from dlscale.sweep.cli import tune_main
from dlscale.sweep.execution import Resources, TrialJob, ray_cluster, run_sweep, run_trial
from dlscale.sweep.results import TrialOutcome, outcomes, ranked, trials_left, write_results
from dlscale.sweep.spec import DEFAULT_SWEEP_FILE, SweepSettings, SweepSpec, load_sweep, trial_config

__all__ = ["tune_main", "Resources", "TrialJob", "ray_cluster", "run_sweep", "run_trial", "TrialOutcome", "outcomes",
           "ranked", "trials_left", "write_results", "DEFAULT_SWEEP_FILE", "SweepSettings", "SweepSpec", "load_sweep",
           "trial_config"]
