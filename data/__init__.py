"""Loom data: tfds builders, sentencepiece tokenizer, packing/masking pipelines, iterators."""
