"""Golden parameter layouts: which mesh axes every parameter of every family uses.

On a data=2, fsdp=2, tensor=2 mesh with the default rules (configs/base.py: DEFAULT_RULES), and
sizes every mesh axis divides, so nothing falls back to replication. A change here is a change
of how every run is laid out, and should be deliberate: regenerate the literals and review them.
"""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs.base import get_config
from train import families
from train.setup import build

SIZES = dict(vocab_size=512, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64,
             max_len=64, dtype="float32", scan_layers=True)
BERT = dict(mlp="gelu", norm="layernorm", pos="learned", use_bias=True, type_vocab_size=2)
# Each family with the blocks of its shipped preset (quickstart, bert_tiny, electra_tiny,
# t5_tiny) and grouped KV heads, plus what pins more parameter kinds: the encoder-decoder
# untied (lm_head). ELECTRA is wider and plain multi-head, so its 1/4-width generator still has
# heads and widths that tensor=2 and fsdp=2 divide.
MODELS = {
    "decoder": dict(family="decoder"),
    "encoder": dict(family="encoder", **BERT),
    "electra": dict(family="electra", **BERT, d_model=64, n_heads=8, n_kv_heads=0, d_ff=128,
                    generator_scale=0.25),
    "encoder_decoder": dict(family="encoder_decoder", n_decoder_layers=2, tie_embeddings=False),
    "xlnet": dict(family="xlnet", mlp="gelu", norm="layernorm", use_bias=True),   # xlnet_tiny
}

# The blocks of one stack (scanned: leading "layers" axis, never sharded).
ENCODER_BLOCK = {   # BERT-shaped: gelu MLP, layernorm, biases
    "['layers']['attn']['query']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['query']['bias']": P(None, "tensor", None),
    "['layers']['attn']['key']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['key']['bias']": P(None, "tensor", None),
    "['layers']['attn']['value']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['value']['bias']": P(None, "tensor", None),
    "['layers']['attn']['out']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['attn']['out']['bias']": P(None, "fsdp"),
    "['layers']['attn_norm']['scale']": P(None, None),
    "['layers']['attn_norm']['bias']": P(None, None),
    "['layers']['mlp']['wi']['kernel']": P(None, "fsdp", "tensor"),
    "['layers']['mlp']['wi']['bias']": P(None, "tensor"),
    "['layers']['mlp']['wo']['kernel']": P(None, "tensor", "fsdp"),
    "['layers']['mlp']['wo']['bias']": P(None, "fsdp"),
    "['layers']['mlp_norm']['scale']": P(None, None),
    "['layers']['mlp_norm']['bias']": P(None, None),
    "['final_norm']['scale']": P(None),
    "['final_norm']['bias']": P(None),
}
SWIGLU_BLOCK = {    # Llama-shaped: fused gate/up kernel, rmsnorm, no biases
    "['layers']['attn']['query']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['key']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['value']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['out']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['attn_norm']['scale']": P(None, None),
    "['layers']['mlp']['wi']['kernel']": P(None, "fsdp", None, "tensor"),
    "['layers']['mlp']['wo']['kernel']": P(None, "tensor", "fsdp"),
    "['layers']['mlp_norm']['scale']": P(None, None),
    "['final_norm']['scale']": P(None),
}
CROSS_ATTENTION = {
    "['layers']['cross_attn']['query']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['cross_attn']['key']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['cross_attn']['value']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['cross_attn']['out']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['cross_norm']['scale']": P(None, None),
}
BERT_EMBEDDINGS = {
    "['embeddings']['embed']['embedding']": P("tensor", "fsdp"),       # vocab x embed
    "['embeddings']['pos']['table']['embedding']": P(None, "fsdp"),
    "['embeddings']['type_embed']['embedding']": P(None, "fsdp"),
    "['embeddings']['norm']['scale']": P(None),
    "['embeddings']['norm']['bias']": P(None),
}
MLM_HEAD = {
    "['mlm_head']['transform']['kernel']": P("fsdp", None),             # embed x embed_out
    "['mlm_head']['transform']['bias']": P(None),
    "['mlm_head']['norm']['scale']": P(None),
    "['mlm_head']['norm']['bias']": P(None),
    "['mlm_head']['bias']": P("tensor"),                                # vocab
}


def under(prefix, specs):
    return {prefix + path: spec for path, spec in specs.items()}


GOLDEN = {
    "decoder": {
        "['embed']['embedding']": P("tensor", "fsdp"),
        **SWIGLU_BLOCK,
    },
    "encoder": {
        **BERT_EMBEDDINGS,
        **under("['encoder']", ENCODER_BLOCK),
        **MLM_HEAD,
        "['pair_head']['pooler']['kernel']": P("fsdp", None),
        "['pair_head']['pooler']['bias']": P(None),
        "['pair_head']['out']['kernel']": P("fsdp", None),
        "['pair_head']['out']['bias']": P(None),
    },
    "electra": {
        **BERT_EMBEDDINGS,
        "['generator']['embed_proj']['kernel']": P("fsdp", None),       # embed x embed_out
        "['generator']['embed_proj']['bias']": P(None),
        **under("['generator']['encoder']", ENCODER_BLOCK),
        **under("['generator']", MLM_HEAD),
        **under("['discriminator']['encoder']", ENCODER_BLOCK),
        "['discriminator']['rtd_head']['transform']['kernel']": P("fsdp", None),
        "['discriminator']['rtd_head']['transform']['bias']": P(None),
        "['discriminator']['rtd_head']['out']['kernel']": P("fsdp", None),
        "['discriminator']['rtd_head']['out']['bias']": P(None),
    },
    "encoder_decoder": {
        "['embed']['embedding']": P("tensor", "fsdp"),
        **under("['encoder']", SWIGLU_BLOCK),
        **under("['decoder']", {**SWIGLU_BLOCK, **CROSS_ATTENTION}),
        "['lm_head']['kernel']": P("fsdp", "tensor"),                   # embed x vocab
    },
    "xlnet": {   # one block serves both streams; the query stream starts from mask_emb
        "['embed']['embedding']": P("tensor", "fsdp"),
        **ENCODER_BLOCK,
        "['mask_emb']": P("fsdp"),
    },
}


def specs_by_path(tree):
    return {jax.tree_util.keystr(path): sharding.spec
            for path, sharding in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_parameter_shardings_match_the_golden_layout(family):
    config = get_config()
    config.model.update(**{**SIZES, **MODELS[family]})
    config.mesh.update(data=2, fsdp=2, tensor=2)
    setup = build(config)
    assert specs_by_path(setup.state_shardings.params) == GOLDEN[family]
    # Adam's moments are laid out like their parameters, leaf by leaf
    moments = {}
    for path, spec in specs_by_path(setup.state_shardings.opt_state).items():
        for name in (".mu", ".nu"):
            if name in path:
                moments.setdefault(name, {})[path.split(name, 1)[1]] = spec
    assert moments == {".mu": GOLDEN[family], ".nu": GOLDEN[family]}
