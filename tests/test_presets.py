"""The accelerator presets of the encoder families have their published sizes: parameters
counted with jax.eval_shape at full size (nothing allocated), over the same parts the published
figure counts, within 2%. (Each preset also takes a real train step with its shapes shrunk, in
tests/test_configs.py, which runs every shipped config.)

Published figures: BERT (Devlin et al. 2018, section 3): base 110M, large 340M; RoBERTa (Liu et
al. 2019, the released roberta.base, 125M); ALBERT (Lan et al. 2019, table 1): base 12M;
ELECTRA (Clark et al. 2020, table 1 and appendix): base 110M, the discriminator that is kept."""
import jax
import pytest

from configs.loader import load
from model.config import ModelConfig
from train import families

# preset: (published parameters, top-level parts of Loom's tree left out of the count, why)
PUBLISHED = {
    "bert_base": (110e6, ()),                  # BertForPreTraining: encoder + MLM + NSP heads
    "bert_large": (340e6, ("mlm_head",)),       # BertModel with its pooler (335M exactly)
    "roberta_base": (125e6, ("pair_head",)),    # RobertaForMaskedLM: no pooler, no NSP
    "albert_base": (12e6, ()),                  # AlbertForPreTraining: MLM + SOP heads
    "electra_base": (110e6, ("generator",)),    # the discriminator and its shared embeddings
}


def parts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per top-level part of the model's tree, from shapes alone."""
    shapes = jax.eval_shape(lambda: families.build(cfg).init(jax.random.PRNGKey(0),
                                                             *families.init_inputs(cfg)))
    return {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes["params"].items()}


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_mapping(load(f"configs/{name}.py").model)


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_has_its_published_parameter_count(name):
    published, left_out = PUBLISHED[name]
    counted = parts(preset(name))
    assert set(left_out) <= set(counted)
    n = sum(v for k, v in counted.items() if k not in left_out)
    print(f"{name}: {n / 1e6:.2f}M (published {published / 1e6:.0f}M)")
    assert abs(n - published) / published < 0.02, (name, n)


def test_albert_base_shares_one_block_and_counts_its_work_twelve_times():
    cfg = preset("albert_base")
    n = sum(parts(cfg).values())
    bert_cfg = ModelConfig.from_mapping(load("configs/bert_base.py").model, vocab_size=30000)
    n_bert = sum(parts(bert_cfg).values())
    # ALBERT-base is a tenth of BERT-base's size but does the same work per token, plus the
    # E -> D projection (less the smaller MLM output: E instead of D wide)
    assert n < n_bert / 9
    flops, flops_bert = (families.flops_per_token(c, m, 512) for c, m in ((cfg, n),
                                                                          (bert_cfg, n_bert)))
    assert flops == pytest.approx(flops_bert, rel=0.25) and flops < flops_bert

