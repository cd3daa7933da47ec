"""Loom training: the loop, optimizer, checkpoints, eval, decoding and the CLIs."""
