"""RoBERTa for a laptop CPU: bert_tiny's encoder in RoBERTa's form, post-LN blocks with the
exact GELU and one token type, masked-LM only (no NSP; dynamic masking, as every Loom MLM run:
each epoch masks anew), a BPE vocabulary and batches four times bert_tiny's. It exports to
Hugging Face's RobertaForMaskedLM (`python -m train.export to-hf --layout roberta`)."""
from configs.bert_tiny import get_config as bert_tiny


def get_config():
    c = bert_tiny()
    c.model.update(mlp="gelu_exact", type_vocab_size=1, post_norm=True)
    c.data.update(batch_size=64)
    c.data.mlm.update(sentence_pairs="none")
    c.data.tokenizer.update(model_type="bpe")
    c.opt.update(lr=1e-3, warmup_steps=50, b2=0.98, eps=1e-6, weight_decay=0.01)
    return c
