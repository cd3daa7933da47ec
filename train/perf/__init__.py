"""Performance reports behind `python -m train.benchmark`: a peer train step (nanodo), memory
per device across meshes, compile time against depth, training-loop overhead, HLO statistics."""
