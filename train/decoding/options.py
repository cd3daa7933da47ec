"""How the decoding loops choose tokens: the options of `python -m train.generate` and of the
final sample of a training run. Kept free of jax so the CLI's --help needs nothing heavy."""
from __future__ import annotations

import dataclasses

from errors import ConfigError

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class Options:
    """How to choose tokens. greedy: argmax; sample: temperature, top_k (0 = off), top_p (1 =
    off); beam: beam_width beams ranked with length_penalty (see train/decoding/beam.py)."""
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_width: int = 4
    length_penalty: float = 1.0

    def __post_init__(self):
        checks = [
            (self.strategy in STRATEGIES, f"strategy {self.strategy!r}: choose one of "
                                          f"{STRATEGIES}"),
            (self.strategy != "sample" or self.temperature > 0,
             f"sampling needs temperature > 0, got {self.temperature}; use strategy greedy"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
