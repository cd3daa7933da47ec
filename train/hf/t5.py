"""Loom's encoder-decoder (model/encoder_decoder.py) in the Hugging Face T5 layout
(`T5ForConditionalGeneration`).

T5 is Loom's encoder-decoder with T5's relative position bias (model.pos=relative_bias, one
table per stack: Hugging Face keeps it in block 0's self-attention), RMS norms without biases,
no 1/sqrt(K) logit scale (model.qk_scale=False) and one shared embedding. The MLP maps to
`feed_forward_proj`: geglu <-> "gated-gelu" (T5 v1.1, gelu_new), relu <-> "relu" (T5 1.0),
swiglu <-> "gated-silu", gelu <-> "gelu_new". The output: T5 1.0 ties it to the embedding and
scales the decoder output by d_model^-0.5 (model.tie_embeddings and model.scale_decoder_output),
T5 v1.1 has its own `lm_head` and no scale. transformers 5 reads the scale from
`scale_decoder_outputs`, older versions from `tie_word_embeddings`, so export writes only the two
combinations both agree on: a tied model without the scale goes out with `lm_head` a copy of
the embedding (same logits; it imports back untied). An untied model with the scale has no
such form and is refused. On import, the output is untied exactly when the checkpoint holds an
`lm_head.weight` (transformers 5 writes `tie_word_embeddings=true` into every T5 config.json).
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

from data.tokenizer import BOS, EOS, PAD
from errors import ConversionError, ModelConfigError
from model.config import ModelConfig
from train.hf.layout import Layout, Tensor, linear, require, same, unstacked

# Loom model.mlp <-> Hugging Face feed_forward_proj (import also takes the aliases below)
FEED_FORWARD = {"geglu": "gated-gelu", "relu": "relu", "swiglu": "gated-silu",
                "gelu": "gelu_new"}
_ALIASES = {"gated-gelu_new": "geglu", "gated-gelu_pytorch_tanh": "geglu",
            "gelu_pytorch_tanh": "gelu"}


def _check(cfg: ModelConfig) -> None:
    require(cfg, "t5", "encoder_decoder", dict(pos="relative_bias", norm="rmsnorm",
                                               use_bias=False, qk_scale=False),
            " (T5: relative position bias, RMS norms, no biases, unscaled attention logits)")
    if cfg.kv_heads != cfg.n_heads:
        raise ModelConfigError(f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) has "
                               "no equivalent in the Hugging Face t5 layout, which needs one KV "
                               "head per query head (model.n_kv_heads=0)")
    if cfg.scale_decoder_output and not cfg.tie_embeddings:
        raise ModelConfigError("model.scale_decoder_output=True with model.tie_embeddings=False "
                               "has no equivalent in the Hugging Face t5 layout (T5 scales "
                               "only a tied output); set one of them the other way")


def _attention(loom: str, hf: str) -> list[Tensor]:
    return [linear(loom + "/query/kernel", hf + ".q.weight"),      # (D, N, K)
            linear(loom + "/key/kernel", hf + ".k.weight"),
            linear(loom + "/value/kernel", hf + ".v.weight"),
            linear(loom + "/out/kernel", hf + ".o.weight", in_axes=2)]


def _mlp(cfg: ModelConfig, loom: str, hf: str) -> list[Tensor]:
    if cfg.mlp in ("geglu", "swiglu"):   # (D, 2, F): [:, 0] gated (activation), [:, 1] linear
        wi = unstacked(loom + "/wi/kernel", (hf + ".wi_0.weight", hf + ".wi_1.weight"), axis=1)
    else:
        wi = linear(loom + "/wi/kernel", hf + ".wi.weight")
    return [wi, linear(loom + "/wo/kernel", hf + ".wo.weight")]


def _shared_output() -> Tensor:
    """A tied model without the scale: the embedding is also written as `lm_head.weight`
    (a checkpoint transformers 5 saved from such a model has `shared.weight` alone)."""
    return Tensor(("embed/embedding",), ("shared.weight", "lm_head.weight"),
                  lambda xs: [xs[0], xs[0]], lambda ws, shapes: [ws[0].reshape(shapes[0])],
                  optional=("lm_head.weight",))


def _tensors(cfg: ModelConfig) -> list[Tensor]:
    if cfg.tie_embeddings and not cfg.scale_decoder_output:
        tensors = [_shared_output()]
    else:
        tensors = [same("embed/embedding", "shared.weight")]
    if not cfg.tie_embeddings:
        tensors.append(linear("lm_head/kernel", "lm_head.weight"))
    for side in ("encoder", "decoder"):
        tensors += [same(f"{side}/pos/table",
                         f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                    same(f"{side}/final_norm/scale", f"{side}.final_layer_norm.weight")]
    for i in range(cfg.n_layers):
        loom, hf = f"encoder/layers_{i}/", f"encoder.block.{i}.layer."
        tensors += [*_attention(loom + "attn", hf + "0.SelfAttention"),
                    same(loom + "attn_norm/scale", hf + "0.layer_norm.weight"),
                    *_mlp(cfg, loom + "mlp", hf + "1.DenseReluDense"),
                    same(loom + "mlp_norm/scale", hf + "1.layer_norm.weight")]
    for i in range(cfg.decoder_layers):
        loom, hf = f"decoder/layers_{i}/", f"decoder.block.{i}.layer."
        tensors += [*_attention(loom + "attn", hf + "0.SelfAttention"),
                    same(loom + "attn_norm/scale", hf + "0.layer_norm.weight"),
                    *_attention(loom + "cross_attn", hf + "1.EncDecAttention"),
                    same(loom + "cross_norm/scale", hf + "1.layer_norm.weight"),
                    *_mlp(cfg, loom + "mlp", hf + "2.DenseReluDense"),
                    same(loom + "mlp_norm/scale", hf + "2.layer_norm.weight")]
    return tensors


def _config(cfg: ModelConfig) -> dict[str, Any]:
    tied = cfg.tie_embeddings and cfg.scale_decoder_output   # see the module docstring
    return dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5",
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size, d_ff=cfg.d_ff,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.rel_buckets,
        relative_attention_max_distance=cfg.rel_max_distance, dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps, initializer_factor=1.0,
        feed_forward_proj=FEED_FORWARD[cfg.mlp], is_encoder_decoder=True, use_cache=True,
        n_positions=cfg.max_len, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
        decoder_start_token_id=BOS, tie_word_embeddings=tied, scale_decoder_outputs=tied,
        torch_dtype=cfg.param_dtype)


def _keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    proj = hf.get("feed_forward_proj", "relu")
    mlp = _ALIASES.get(proj) or {v: k for k, v in FEED_FORWARD.items()}.get(proj)
    if mlp is None:
        raise ConversionError(f"config.json has feed_forward_proj={proj!r}; Loom's T5 MLPs are "
                              f"{sorted(FEED_FORWARD.values())} (its GELU is the tanh "
                              "approximation, gelu_new)")
    d, n = hf.get("d_model", 512), hf.get("num_heads", 8)
    k = hf.get("d_kv", 64)
    layers = hf.get("num_layers", 6)
    tied = hf.get("tie_word_embeddings", True) is not False
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_heads=n, n_kv_heads=0,
                head_dim=0 if k * n == d else k, n_layers=layers,
                n_decoder_layers=hf.get("num_decoder_layers") or layers,
                d_ff=hf.get("d_ff", 2048), mlp=mlp, norm="rmsnorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-6), pos="relative_bias",
                rel_buckets=hf.get("relative_attention_num_buckets", 32),
                rel_max_distance=hf.get("relative_attention_max_distance", 128),
                max_len=hf.get("n_positions") or 512, use_bias=False, qk_scale=False,
                tie_embeddings=tied,
                scale_decoder_output=bool(hf.get("scale_decoder_outputs", tied)))


def _tensor_keys(names: Collection[str]) -> dict[str, Any]:
    """An `lm_head.weight` of its own: the output is untied (whatever config.json says)."""
    return {"tie_embeddings": False} if "lm_head.weight" in names else {}


T5 = Layout(name="t5", model_type="t5", architecture="T5ForConditionalGeneration",
            family="encoder_decoder", check=_check, tensors=_tensors, hf_config=_config,
            model_keys=_keys, objective="span_corruption",
            stacks=("encoder/layers", "decoder/layers"), prefix="", heads=("lm_head.",),
            tensor_keys=_tensor_keys,
            ignored=r"^(encoder|decoder)\.embed_tokens\.weight$|"
                    r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias")
