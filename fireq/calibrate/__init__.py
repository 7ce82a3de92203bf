"""Calibration: capture each decoder layer's inputs, collect statistics layer by layer."""
