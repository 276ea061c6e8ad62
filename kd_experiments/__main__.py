"""`python -m kd_experiments [overrides]`: the Hydra entry point."""

import sys

import hydra
from omegaconf import DictConfig

from kd_experiments.errors import UserError
from kd_experiments.sweep import check_optimized_metric, in_multirun, record_failed_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; returns `summary[optimized_metric]`, the number a sweeper (Optuna) optimises."""
    from kd_experiments.resume import Interrupted
    from kd_experiments.train import train  # heavy imports after Hydra has parsed --help / --cfg

    try:
        check_optimized_metric(cfg)  # a misspelt metric stops now, not after training
        return train(cfg)
    except Interrupted as error:  # a sweep stops too: its scheduler is stopping this process
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(128 + error.signum)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if in_multirun():  # the other jobs still run; the sweep ends non-zero and names this one
            record_failed_job(str(error))
            # No value: the Optuna sweeper marks the trial failed and the study goes on (a NaN would not do:
            # Optuna 2.x refuses it in a way that stops the study).
            return None
        sys.exit(2)


if __name__ == "__main__":
    main()
