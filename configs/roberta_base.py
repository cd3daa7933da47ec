"""RoBERTa-base (Liu et al. 2019): BERT-base's encoder trained without NSP, with dynamic masking
(Loom draws each document's masks from its place in the stream, so every epoch masks anew),
much larger batches (8192 x 512 tokens) and a 50265-piece BPE vocabulary; 125M parameters as
published (Loom counts 124.7M with the MLM head and without the unused sentence-pair head, the
parts of a RobertaForMaskedLM; tests/test_presets.py).

Differences from the paper: the vocabulary is sentencepiece BPE with byte fallback
(`data.tokenizer.model_type=bpe`), not GPT-2's byte-level BPE, and the token types are one
(`type_vocab_size=1`) as in the released checkpoints. RoBERTa's GELU is the exact one and
its position table starts at padding_idx + 1: `python -m train.export to-hf --layout roberta`
writes a RobertaForMaskedLM. Adam b2=0.98, eps 1e-6, peak lr 6e-4 after 24k warmup steps, 500k
steps; raise opt.grad_accum where 8192 rows do not fit the devices.
"""
from configs.bert_base import get_config as bert_base


def get_config():
    c = bert_base()
    c.model.update(vocab_size=50265, mlp="gelu_exact", type_vocab_size=1)
    c.data.update(batch_size=8192)
    c.data.mlm.update(sentence_pairs="none")
    c.data.tokenizer.update(vocab_size=50265, model_type="bpe")
    c.opt.update(lr=6e-4, warmup_steps=24_000, b2=0.98, eps=1e-6, weight_decay=0.01)
    c.train.update(steps=500_000)
    return c
