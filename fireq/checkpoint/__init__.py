"""The fireq checkpoint: safetensors + config.json with a versioned quantization_config."""
