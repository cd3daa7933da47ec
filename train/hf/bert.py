"""Loom's encoder (model/encoder.py) in the Hugging Face BERT layout (`BertForPreTraining`).

BERT is Loom's encoder with post-LN blocks (model.post_norm), layernorm, GELU, learned
positions, biases and token-type embeddings: embeddings norm(word + position + type), the
blocks, the masked-LM head (dense, GELU, norm, then the tied or untied output plus a bias) and
the sentence-pair head (tanh pooler on [CLS], 2-way classifier). Loom's GELU is the tanh
approximation, which BERT configs call "gelu_new"; a checkpoint with the exact "gelu" (the
original BERT) is refused on import rather than silently changed.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from data.tokenizer import PAD
from errors import ConversionError, ModelConfigError
from model.config import ModelConfig
from train.hf.layout import Layout, Tensor, flat, linear, require, require_plain_heads, same, \
    unsupported


def _check(cfg: ModelConfig) -> None:
    require(cfg, "bert", "encoder", dict(post_norm=True, norm="layernorm", mlp="gelu",
                                         pos="learned", use_bias=True, embed_dim=0,
                                         share_layers=False),
            " (BERT's blocks are post-LN with layernorm, gelu, learned positions and biases)")
    require_plain_heads(cfg, "bert")
    if cfg.type_vocab_size < 1:
        raise ModelConfigError("model.type_vocab_size=0 has no equivalent in the Hugging Face "
                               "bert layout, which always has token-type embeddings")


def _norm(loom: str, hf: str) -> list[Tensor]:
    return [same(loom + "/scale", hf + ".weight"), same(loom + "/bias", hf + ".bias")]


def _dense(loom: str, hf: str, in_axes: int = 1) -> list[Tensor]:
    return [linear(loom + "/kernel", hf + ".weight", in_axes), flat(loom + "/bias", hf + ".bias")]


def _flipped(t: Tensor) -> Tensor:
    """`t` with its last (output) axis reversed between Loom and Hugging Face."""
    return Tensor(t.loom, t.hf, lambda xs: t.to_hf([x[..., ::-1] for x in xs]),
                  lambda ws, shapes: [x[..., ::-1] for x in t.to_loom(ws, shapes)], t.optional)


def pair_classifier(loom: str, hf: str) -> list[Tensor]:
    """The 2-way sentence-pair classifier. Loom's class 1 is "B follows A" (NSP) / "in order"
    (SOP), Hugging Face's class 0 (`next_sentence_label` / `sentence_order_label` 0), so the
    two output columns swap: the exported head gives transformers' labels their meaning."""
    return [_flipped(t) for t in _dense(loom, hf)]


def _tensors(cfg: ModelConfig) -> list[Tensor]:
    tensors = [same("embeddings/embed/embedding", "bert.embeddings.word_embeddings.weight"),
               same("embeddings/pos/table/embedding",
                    "bert.embeddings.position_embeddings.weight"),
               same("embeddings/type_embed/embedding",
                    "bert.embeddings.token_type_embeddings.weight"),
               *_norm("embeddings/norm", "bert.embeddings.LayerNorm")]
    for i in range(cfg.n_layers):
        loom, hf = f"encoder/layers_{i}/", f"bert.encoder.layer.{i}."
        tensors += [
            *_dense(loom + "attn/query", hf + "attention.self.query"),    # (D, N, K)
            *_dense(loom + "attn/key", hf + "attention.self.key"),
            *_dense(loom + "attn/value", hf + "attention.self.value"),
            *_dense(loom + "attn/out", hf + "attention.output.dense", in_axes=2),
            *_norm(loom + "attn_norm", hf + "attention.output.LayerNorm"),
            *_dense(loom + "mlp/wi", hf + "intermediate.dense"),
            *_dense(loom + "mlp/wo", hf + "output.dense"),
            *_norm(loom + "mlp_norm", hf + "output.LayerNorm"),
        ]
    tensors += [*_dense("pair_head/pooler", "bert.pooler.dense"),
                *pair_classifier("pair_head/out", "cls.seq_relationship"),
                *_dense("mlm_head/transform", "cls.predictions.transform.dense"),
                *_norm("mlm_head/norm", "cls.predictions.transform.LayerNorm")]
    if cfg.tie_embeddings:
        return tensors + [same("mlm_head/bias", "cls.predictions.bias")]
    return tensors + [linear("mlm_head/out/kernel", "cls.predictions.decoder.weight"),
                      _output_biases()]


def _output_biases(decoder: str = "cls.predictions.decoder.bias",
                   own: str = "cls.predictions.bias") -> Tensor:
    """An untied Loom MLM head adds two biases (its output layer's and its own per-token one);
    an untied BERT adds its output layer's (`decoder.bias`; `predictions.bias` is tied to it
    only when the embeddings are). Export their sum to both, import it as the per-token bias
    with a zero output-layer bias: the same outputs, the biases come back summed."""
    return Tensor(("mlm_head/bias", "mlm_head/out/bias"),
                  (decoder, own),
                  lambda xs: [xs[0] + xs[1]] * 2,
                  lambda ws, shapes: [ws[0].reshape(shapes[0]), np.zeros(shapes[1], ws[0].dtype)])


def _config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        architectures=["BertForPreTraining"], model_type="bert", vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu_new",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute", pad_token_id=PAD,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        torch_dtype=cfg.param_dtype)


def _keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "gelu") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"config.json has hidden_act={hf.get('hidden_act', 'gelu')!r}; "
                              "Loom's GELU is the tanh approximation (gelu_new)")
    unsupported(hf, "position_embedding_type", "absolute", "absolute")
    unsupported(hf, "is_decoder", False, False)
    return dict(vocab_size=hf["vocab_size"], d_model=hf.get("hidden_size", 768),
                n_heads=hf.get("num_attention_heads", 12), n_kv_heads=0, head_dim=0,
                n_layers=hf.get("num_hidden_layers", 12), d_ff=hf.get("intermediate_size", 3072),
                mlp="gelu", norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
                pos="learned", max_len=hf.get("max_position_embeddings", 512),
                tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=True,
                post_norm=True, type_vocab_size=hf.get("type_vocab_size", 2))


BERT = Layout(name="bert", model_type="bert", architecture="BertForPreTraining",
              family="encoder", check=_check, tensors=_tensors, hf_config=_config,
              model_keys=_keys, objective="mlm", stacks=("encoder/layers",), prefix="bert.",
              heads=("cls.",), renames=((r"LayerNorm\.gamma$", "LayerNorm.weight"),
                                        (r"LayerNorm\.beta$", "LayerNorm.bias")),
              ignored=r"position_ids$|^cls\.predictions\.decoder\.(weight|bias)$")
