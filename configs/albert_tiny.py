"""ALBERT for a laptop CPU: bert_tiny's encoder in ALBERT's form, post-LN blocks with
factorised embeddings (E = 64, projected up to 256) and one block shared by the 4 layers,
masked-LM + sentence-order prediction (SOP) on the Python standard library. It exports to
Hugging Face's AlbertForPreTraining (`python -m train.export to-hf`)."""
from configs.bert_tiny import get_config as bert_tiny


def get_config():
    c = bert_tiny()
    c.model.update(embed_dim=64, share_layers=True, post_norm=True)
    c.data.mlm.update(sentence_pairs="sop")
    return c
