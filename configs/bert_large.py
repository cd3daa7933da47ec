"""BERT-large (Devlin et al. 2018): bert_base with 24 blocks of 1024, 16 heads, MLP 4096; 340M
parameters as published (Loom counts 335.1M without the MLM head, as BertModel with its pooler,
and 336.2M with it; tests/test_presets.py)."""
from configs.bert_base import get_config as bert_base


def get_config():
    c = bert_base()
    c.model.update(d_model=1024, n_heads=16, n_layers=24, d_ff=4096)
    return c
