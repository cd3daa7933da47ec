"""Compression of Loom runs: quantization, pruning, layer dropping (distillation is a training
objective: configs/distill_quickstart.py). Every command reads a run directory and writes a new
one that train.eval, train.generate and train.export accept."""
