"""Quantize and pack: float linears -> QuantLinear, attention modules -> INT4 KV settings."""
