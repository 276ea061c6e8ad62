"""`python -m kd_experiments [overrides]`: the Hydra entry point."""

import sys

import hydra
from omegaconf import DictConfig

from kd_experiments.errors import UserError
from kd_experiments.sweep import in_multirun, record_failed_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kd_experiments.resume import Interrupted
    from kd_experiments.train import train  # heavy imports after Hydra has parsed --help / --cfg

    try:
        return train(cfg)
    except Interrupted as error:  # a sweep stops too: its scheduler is stopping this process
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(128 + error.signum)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if in_multirun():  # the other jobs still run; the sweep ends non-zero and names this one
            record_failed_job(str(error))
            return None
        sys.exit(2)


if __name__ == "__main__":
    main()
