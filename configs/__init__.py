"""Experiment configs: one file per experiment, each defining get_config()."""
