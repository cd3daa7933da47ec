"""ELECTRA for a laptop CPU: bert_tiny's encoder as the discriminator, with a generator a quarter
of its width sharing its embeddings, trained jointly with replaced-token detection on the Python
standard library."""
from configs.bert_tiny import get_config as bert_tiny


def get_config():
    c = bert_tiny()
    c.model.update(family="electra", generator_scale=0.25)
    c.train.update(objective="electra")
    return c
