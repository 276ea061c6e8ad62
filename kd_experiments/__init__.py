"""kd_experiments: a Hydra-configured knowledge-distillation research framework."""

import logging

from kd_experiments.resolvers import register as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()
# torchmetrics imports matplotlib; its first import logs building a font cache, which would be written into
# the run's log (even that of a finished run whose directory a refused command only looked at).
logging.getLogger("matplotlib").setLevel(logging.WARNING)
