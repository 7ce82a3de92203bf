"""Model loading (directory, hub id, GGUF) and the per-architecture facts fireq needs."""
