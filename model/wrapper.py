"""What the wrappers of a model share: LoRA (train/lora.py), a soft prompt (train/soft_prompt.py)
and quantization (model/quant.py) each hold the family's module as `inner` and give `init` and
`apply` as a Flax module's, which is all the train state, the steps and the objectives use."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelWrapper:
    """`inner`'s `init` and `apply` (a subclass changes them); every other attribute, such as
    the methods objectives name (generator_logits, encode, ...), is `inner`'s."""
    inner: nn.Module

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def n_inputs(self):
        return getattr(self.inner, "n_inputs", None)

    def init(self, rng, *args, **kwargs) -> Any:
        return self.inner.init(rng, *args, **kwargs)

    def apply(self, variables, *args, **kwargs) -> Any:
        return self.inner.apply(variables, *args, **kwargs)
