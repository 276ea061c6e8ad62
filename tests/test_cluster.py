"""The SLURM launcher preset composes and ties the SLURM geometry to the trainer's (one task per GPU)."""

from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR


def test_slurm_launcher_follows_the_trainer_geometry():
    overrides = ["hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2", "trainer.strategy=ddp"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (8, 2, "ddp")
