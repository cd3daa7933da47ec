"""Prompt tuning (Lester et al. 2021) of a model that writes text: `finetune.mode=prompt` with
train.objective=text2text.

`SoftPromptModel` wraps the family's own model (the heads' `TaskModel` holds its soft prompt
itself): its params are the model's plus "prompt", finetune.prompt_length trained vectors of
width d_model that every call reads before the tokens (a decoder's prompt, an encoder-decoder's
encoder input, whose prompt outputs the decoder attends to). The optimizer trains "prompt"
alone (train/layerwise.py), so the backbone gets no optimizer state. Generation reads the prompt
from the params (`split`): the decoding steppers prefill it before the text's own prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from model.sharding import unboxed
from model.wrapper import ModelWrapper

KEY = "prompt"


def split(params: Any) -> tuple[Any, jax.Array | None]:
    """The model's own params and the soft prompt_PxD (None for a run without one)."""
    if not isinstance(params, dict) or KEY not in params:
        return params, None
    params = dict(params)
    return params, unboxed(params.pop(KEY))


@dataclasses.dataclass(frozen=True)
class SoftPromptModel(ModelWrapper):
    """`init` and `apply` as a Flax module's (what the train state, the steps and the
    objectives use), with the soft prompt in params["prompt"]."""
    length: int
    init_std: float

    def init(self, rng, *args, **kwargs):
        variables = self.inner.init(rng, *args, **kwargs)
        cfg = self.inner.cfg
        prompt = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                              (None, "embed"))(
            jax.random.fold_in(rng, 1), (self.length, cfg.d_model), cfg.weights_dtype)
        return {**variables, "params": {**variables["params"], KEY: prompt}}

    def apply(self, variables, *args, **kwargs):
        params, prompt = split(variables["params"])
        return self.inner.apply({**variables, "params": params}, *args, prompt_PxD=prompt,
                                **kwargs)
