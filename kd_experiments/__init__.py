"""kd_experiments: a Hydra-configured knowledge-distillation research framework."""

__version__ = "0.1.0"
