"""The model's hyper-parameters as a frozen dataclass, validated once."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from configs.base import get_config as base_config
from configs.loader import number_problem
from errors import ModelConfigError

# decoder: causal LM; encoder: BERT-style bidirectional LM with MLM and sentence-pair heads;
# encoder_decoder: T5-style seq2seq; electra: a small generator and an encoder discriminator;
# xlnet: two-stream permutation LM (model/xlnet.py).
FAMILIES = ("decoder", "encoder", "encoder_decoder", "electra", "xlnet")
CHOICES = {
    "mlp": ("swiglu", "gelu", "gelu_exact", "geglu", "relu"),   # gelu: the tanh approximation
    "norm": ("rmsnorm", "layernorm"),
    "pos": ("rope", "learned", "sinusoidal", "relative_bias"),
    "remat": ("none", "full", "dots", "minimal"),
    "attention": ("auto", "xla", "cudnn"),
    "cudnn_segments": ("lengths", "mask"),
    "dtype": ("bfloat16", "float32", "float16"),
    "param_dtype": ("bfloat16", "float32"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every key of the config's `model` section. Defaults are stated once, in configs/base.py:
    `create(...)` and `from_mapping(...)` start from them."""
    family: str
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    d_ff: int
    mlp: str
    norm: str
    norm_eps: float
    pos: str
    rope_theta: float
    max_len: int
    tie_embeddings: bool
    use_bias: bool
    dropout: float
    dtype: str
    param_dtype: str
    scan_layers: bool
    remat: str
    attention: str
    cudnn_segments: str  # packed rows on cuDNN: segment lengths/offsets, or a dense T x T mask
    init_std: float
    type_vocab_size: int  # encoder, electra: token types (sentence A/B); 0 = none
    post_norm: bool  # post-LN blocks, norm(x + f(x)) (BERT, the original Transformer)
    n_decoder_layers: int  # encoder_decoder: decoder blocks (n_layers: encoder); 0 = same
    generator_scale: float  # electra: generator width / discriminator width
    # ALBERT (encoder): factorised embeddings and cross-layer parameter sharing
    embed_dim: int  # embeddings of this width projected up to d_model; 0 = d_model, no projection
    share_layers: bool  # one block's parameters applied n_layers times
    # T5 as published (encoder_decoder): pos="relative_bias" buckets, no 1/sqrt(K) logit scale,
    # T5 1.0's d_model^-0.5 on the decoder output before a tied projection
    rel_buckets: int
    rel_max_distance: int
    qk_scale: bool
    scale_decoder_output: bool
    # not a model.* key: quant.activations of a quantized run (train.setup.build sets it)
    quant_activations: str = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            problem = number_problem(f"model.{field.name}", getattr(self, field.name))
            if problem:
                raise ModelConfigError(problem)
        if self.family not in FAMILIES:
            raise ModelConfigError(f"model.family={self.family!r}: choose one of {FAMILIES}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ModelConfigError(
                    f"model.{key}={getattr(self, key)!r}: choose one of {allowed}")
        for key in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            if getattr(self, key) <= 0:
                raise ModelConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        for key, zero in (("n_kv_heads", "n_heads"), ("head_dim", "d_model // n_heads"),
                          ("type_vocab_size", "none"), ("n_decoder_layers", "n_layers"),
                          ("embed_dim", "d_model, no projection")):
            if getattr(self, key) < 0:
                raise ModelConfigError(f"model.{key} must be >= 0 (0 = {zero}), got "
                                       f"{getattr(self, key)}")
        for key in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, key) > 0:
                raise ModelConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.n_heads % self.kv_heads:
            raise ModelConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads="
                f"{self.kv_heads} (grouped-query attention shares each KV head by a group)")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ModelConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads};"
                " set model.head_dim explicitly")
        if self.pos == "rope" and self.head_size % 2:
            size = (f"model.head_dim={self.head_dim}" if self.head_dim else
                    f"model.d_model // model.n_heads = {self.head_size}")
            raise ModelConfigError(f"model.pos='rope' needs an even head size, but {size} is odd;"
                                   " set an even model.head_dim (or another model.pos)")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.generator_scale <= 1.0:
            raise ModelConfigError(f"model.generator_scale must be in (0, 1], got "
                                   f"{self.generator_scale}")
        for key in ("embed_dim", "share_layers"):
            if getattr(self, key) and self.family != "encoder":
                raise ModelConfigError(
                    f"model.{key}={getattr(self, key)!r} (ALBERT) is for the encoder family, not "
                    f"model.family={self.family!r}; leave it at its default")
        self._check_t5()
        if self.family == "electra":
            self.generator_config()  # the scaled generator must be a valid model too

    def _check_t5(self) -> None:
        if self.rel_buckets < 2 or self.rel_max_distance < 2:
            raise ModelConfigError(f"model.rel_buckets={self.rel_buckets} and model."
                                   f"rel_max_distance={self.rel_max_distance} must be >= 2")
        if self.rel_max_distance < self.rel_buckets // 2:
            raise ModelConfigError(
                f"model.rel_max_distance={self.rel_max_distance} must be >= model.rel_buckets // 2"
                f" = {self.rel_buckets // 2} (half the buckets are exact offsets 0..buckets/4)")
        for key, on in (("pos", self.pos == "relative_bias"),
                        ("scale_decoder_output", self.scale_decoder_output)):
            if on and self.family != "encoder_decoder":
                raise ModelConfigError(
                    f"model.{key}={getattr(self, key)!r} is T5's, for model.family="
                    f"'encoder_decoder', not {self.family!r}")
        if self.pos == "relative_bias" and self.attention == "cudnn":
            raise ModelConfigError("model.pos='relative_bias' runs on the xla attention kernel "
                                   "(a learned B x N x T x S bias; the cuDNN path with it is "
                                   "untested); set model.attention=auto or xla")

    @property
    def unbounded_positions(self) -> bool:
        """Positions without a table (RoPE, relative buckets): any length fits."""
        return self.pos in ("rope", "relative_bias")

    @property
    def decoder_layers(self) -> int:
        """Blocks of an encoder_decoder's decoder stack."""
        return self.n_decoder_layers or self.n_layers

    def generator_config(self) -> "ModelConfig":
        """ELECTRA's generator: the discriminator's config with d_model, heads and d_ff scaled by
        `generator_scale` (head size kept, as in the paper's code); it shares the embeddings."""
        scale = self.generator_scale   # in (0, 1]: __post_init__ checked it
        heads = max(1, round(self.n_heads * scale))
        kv_heads = max(1, round(self.kv_heads * scale)) if self.n_kv_heads else 0
        try:
            return dataclasses.replace(
                self, family="encoder", d_model=max(1, round(self.d_model * scale)),
                n_heads=heads, n_kv_heads=kv_heads, d_ff=max(1, round(self.d_ff * scale)))
        except ModelConfigError as e:
            raise ModelConfigError(
                f"model.generator_scale={scale} gives an invalid ELECTRA generator (d_model="
                f"{round(self.d_model * scale)}, n_heads={heads}, n_kv_heads={kv_heads}): {e}; "
                "choose a scale that keeps d_model divisible by the heads") from e

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds from a config section (a ConfigDict or dict) and `overrides`; a key left out
        takes configs/base.py's default; unknown keys are an error."""
        values = dict(values, **overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown model keys {unknown}; known keys: {sorted(known)}")
        return cls(**{**base_config().model.to_dict(), **values})

    @classmethod
    def create(cls, **values: Any) -> "ModelConfig":
        """configs/base.py's model with `values` changed (vocab_size has no default: set it)."""
        return cls.from_mapping(values)

    @property
    def embed_width(self) -> int:
        """Width E of the token, position and type embeddings (and of the tied MLM output)."""
        return self.embed_dim or self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
