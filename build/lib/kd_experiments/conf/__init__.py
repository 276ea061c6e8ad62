"""The Hydra configs, shipped inside the package (an installed wheel finds them as `kd_experiments.conf`)."""
