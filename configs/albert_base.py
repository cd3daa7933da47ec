"""ALBERT-base (Lan et al. 2019): BERT-base's shape with factorised embeddings (E = 128,
projected up to 768) and one block shared by all 12 layers, a 30000-piece sentencepiece
vocabulary, MLM + sentence-order prediction; 12M parameters as published (Loom counts 11.8M
with the MLM and SOP heads, the parts of an AlbertForPreTraining; tests/test_presets.py). The shared
block still does 12 blocks' work, which the FLOPs (and MFU) count.

The paper trains 125k steps of 4096 x 512 tokens with LAMB at 0.00176; Loom has AdamW, so the
learning rate here is lower. ALBERT's GELU is the tanh one ("gelu_new"), Loom's:
`python -m train.export to-hf` writes an AlbertForPreTraining.
"""
from configs.bert_base import get_config as bert_base


def get_config():
    c = bert_base()
    c.model.update(vocab_size=30000, embed_dim=128, share_layers=True, dropout=0.0)
    c.data.update(batch_size=4096)
    c.data.mlm.update(sentence_pairs="sop")
    c.data.tokenizer.update(vocab_size=30000)
    c.opt.update(lr=1e-3, warmup_steps=3125, weight_decay=0.01)
    c.train.update(steps=125_000)
    return c
