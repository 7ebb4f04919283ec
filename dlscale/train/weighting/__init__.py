"""Loss weightings as registered parts: fixed, uncertainty, dwa, famo, upgrad (see `base` for the hooks)."""
from dlscale.train.weighting.base import WEIGHTINGS, LossWeighting, build_weighting, register_weighting, weighting_class
from dlscale.train.weighting.classic import DynamicWeightAverage, FixedWeighting, UncertaintyWeighting
from dlscale.train.weighting.famo import FAMO
from dlscale.train.weighting.gradient import UPGrad

__all__ = ["WEIGHTINGS", "LossWeighting", "build_weighting", "register_weighting", "weighting_class",
           "FixedWeighting", "UncertaintyWeighting", "DynamicWeightAverage", "FAMO", "UPGrad"]
