"""kd_experiments: a Hydra-configured knowledge-distillation research framework."""

from kd_experiments.resolvers import register as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()
