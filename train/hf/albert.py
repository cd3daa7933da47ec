"""Loom's encoder with ALBERT's options in the Hugging Face ALBERT layout (`AlbertForPreTraining`).

ALBERT is BERT's post-LN encoder with factorised embeddings (`model.embed_dim`: word, position
and type tables of width E, normalised, then `embedding_hidden_mapping_in` up to d_model, which
is Loom's "embeddings/proj") and, usually, one block shared by every layer
(`model.share_layers`: one layer group, `num_hidden_groups=1`); unshared blocks map to one
group per layer. The masked-LM head projects back to E, normalises and uses the tied word
embeddings, as Loom's does; the sentence-order head is BERT's pooler + 2-way classifier with
Loom's label order (logit 1 = the right order), as the bert layout keeps it.
"""
from __future__ import annotations

from typing import Any, Mapping

from data.tokenizer import PAD
from errors import ConversionError, ModelConfigError
from model.config import ModelConfig
from train.hf.bert import _dense, _norm, pair_classifier
from train.hf.layout import Layout, Tensor, require, require_plain_heads, same, unsupported


def _check(cfg: ModelConfig) -> None:
    require(cfg, "albert", "encoder", dict(post_norm=True, norm="layernorm", mlp="gelu",
                                           pos="learned", use_bias=True, tie_embeddings=True),
            " (ALBERT's blocks are post-LN with layernorm, gelu, learned positions and biases, "
            "and its MLM output is the word embedding)")
    require_plain_heads(cfg, "albert")
    if not cfg.embed_dim:
        raise ModelConfigError("model.embed_dim=0 has no equivalent in the Hugging Face albert "
                               "layout, which always projects its embeddings (embedding_size) up "
                               "to hidden_size; set model.embed_dim")
    if cfg.type_vocab_size < 1:
        raise ModelConfigError("model.type_vocab_size=0 has no equivalent in the Hugging Face "
                               "albert layout, which always has token-type embeddings")


def _block(loom: str, hf: str) -> list[Tensor]:
    return [*_dense(loom + "attn/query", hf + "attention.query"),     # (D, N, K)
            *_dense(loom + "attn/key", hf + "attention.key"),
            *_dense(loom + "attn/value", hf + "attention.value"),
            *_dense(loom + "attn/out", hf + "attention.dense", in_axes=2),
            *_norm(loom + "attn_norm", hf + "attention.LayerNorm"),
            *_dense(loom + "mlp/wi", hf + "ffn"),
            *_dense(loom + "mlp/wo", hf + "ffn_output"),
            *_norm(loom + "mlp_norm", hf + "full_layer_layer_norm")]


def _tensors(cfg: ModelConfig) -> list[Tensor]:
    tensors = [same("embeddings/embed/embedding", "albert.embeddings.word_embeddings.weight"),
               same("embeddings/pos/table/embedding",
                    "albert.embeddings.position_embeddings.weight"),
               same("embeddings/type_embed/embedding",
                    "albert.embeddings.token_type_embeddings.weight"),
               *_norm("embeddings/norm", "albert.embeddings.LayerNorm"),
               *_dense("embeddings/proj", "albert.encoder.embedding_hidden_mapping_in")]
    groups = ["encoder/layers_shared/"] if cfg.share_layers else \
        [f"encoder/layers_{i}/" for i in range(cfg.n_layers)]
    for g, loom in enumerate(groups):
        tensors += _block(loom, f"albert.encoder.albert_layer_groups.{g}.albert_layers.0.")
    return tensors + [*_dense("pair_head/pooler", "albert.pooler"),
                      *pair_classifier("pair_head/out", "sop_classifier.classifier"),
                      *_dense("mlm_head/transform", "predictions.dense"),
                      *_norm("mlm_head/norm", "predictions.LayerNorm"),
                      same("mlm_head/bias", "predictions.bias")]


def _config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        architectures=["AlbertForPreTraining"], model_type="albert", vocab_size=cfg.vocab_size,
        embedding_size=cfg.embed_dim, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_hidden_groups=1 if cfg.share_layers else cfg.n_layers, inner_group_num=1,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu_new",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=cfg.dropout, max_position_embeddings=cfg.max_len,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
        position_embedding_type="absolute", pad_token_id=PAD, tie_word_embeddings=True,
        initializer_range=cfg.init_std, torch_dtype=cfg.param_dtype)


def _keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"config.json has hidden_act={hf.get('hidden_act')!r}; Loom's "
                              "GELU is the tanh approximation (gelu_new)")
    unsupported(hf, "position_embedding_type", "absolute", "absolute")
    unsupported(hf, "inner_group_num", 1, 1)
    unsupported(hf, "tie_word_embeddings", True, True)
    layers, groups = hf.get("num_hidden_layers", 12), hf.get("num_hidden_groups", 1)
    if groups not in (1, layers):
        raise ConversionError(f"config.json has num_hidden_groups={groups} for "
                              f"num_hidden_layers={layers}; Loom shares one block by all layers "
                              "(1) or none (num_hidden_layers)")
    return dict(vocab_size=hf["vocab_size"], d_model=hf.get("hidden_size", 4096),
                embed_dim=hf.get("embedding_size", 128), share_layers=groups == 1 < layers,
                n_heads=hf.get("num_attention_heads", 64), n_kv_heads=0, head_dim=0,
                n_layers=layers, d_ff=hf.get("intermediate_size", 16384), mlp="gelu",
                norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), pos="learned",
                max_len=hf.get("max_position_embeddings", 512), tie_embeddings=True,
                use_bias=True, post_norm=True, type_vocab_size=hf.get("type_vocab_size", 2))


ALBERT = Layout(name="albert", model_type="albert", architecture="AlbertForPreTraining",
                family="encoder", check=_check, tensors=_tensors, hf_config=_config,
                model_keys=_keys, objective="mlm", stacks=("encoder/layers",), prefix="albert.",
                heads=("predictions.", "sop_classifier."),
                ignored=r"position_ids$|token_type_ids$|^predictions\.decoder\.(weight|bias)$")
