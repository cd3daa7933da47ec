"""Hugging Face interop: tensor layouts (Llama, GPT-2, BERT), the sentencepiece <-> tokenizers
bridge, and export/import of whole model directories."""
