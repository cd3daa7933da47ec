"""ELECTRA-base (Clark et al. 2020): a BERT-base discriminator (12 x 768, 30522-piece
vocabulary) and a generator a third of its width (256, 4 heads, MLP 1024) sharing its
embeddings, trained jointly with replaced-token detection; 110M parameters as published for the
discriminator (Loom counts 109.5M for the embeddings, the discriminator and its RTD head, and
9.9M more for the generator with its MLM head; tests/test_presets.py).

The paper: 766k steps of 256 x 512 tokens, lr 2e-4, 10k warmup, weight decay 0.01, no NSP.
"""
from configs.bert_base import get_config as bert_base


def get_config():
    c = bert_base()
    c.model.update(family="electra", generator_scale=1 / 3)
    c.data.mlm.update(sentence_pairs="none")
    c.opt.update(lr=2e-4, warmup_steps=10_000)
    c.train.update(objective="electra", steps=766_000)
    return c
