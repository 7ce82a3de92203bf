"""Evaluation: perplexity of any causal LM, quantized or not."""
