"""Hyper-parameter sweeps (`python -m train.sweep`): the search space (space.py), every trial's
config validated before anything runs (plan.py), launchers (launch.py) and results (results.py)."""
