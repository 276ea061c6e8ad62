"""Distillation methods: one file each, an nn.Module returning named loss terms.

Add a method by writing `methods/<name>.py` (a `DistillationMethod` subclass) and `conf/method/<name>.yaml`
(`_target_` of the objective plus the weight of each loss term); nothing else changes.
"""

from kd_experiments.methods.base import DistillationMethod

__all__ = ["DistillationMethod"]
