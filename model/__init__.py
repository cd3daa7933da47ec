"""Loom's Flax modules: shared layers, one module per model family, sharding rules.

`train/families.py` maps each family name (model.config.FAMILIES) to its module and says
everything else Loom knows about it.
"""
from model.config import FAMILIES, ModelConfig
from model.decoder import DecoderLM
from model.electra import ElectraLM
from model.encoder import EncoderLM
from model.encoder_decoder import EncoderDecoderLM

__all__ = ["FAMILIES", "ModelConfig", "DecoderLM", "ElectraLM", "EncoderLM", "EncoderDecoderLM"]
