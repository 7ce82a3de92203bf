"""Quantized modules swapped into Hugging Face models: QuantLinear and the INT4-KV attention."""
