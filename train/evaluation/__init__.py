"""Evaluation: loss, perplexity and bits per byte over a split, and zero-shot multiple-choice
scoring."""
