"""Decoding: steppers (how each family reads a prompt and extends it one token at a time), the
sampling and beam-search loops over them, and the text-generation API."""
