"""Number formats: FP8 E4M3 activations/queries, INT4 weights and KV cache, nibble packing."""
