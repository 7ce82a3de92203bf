"""Registration with transformers: the "fireq" quantization method and attention function.

After `import fireq`, `AutoModelForCausalLM.from_pretrained(checkpoint)` sees
quantization_config.quant_method == "fireq", builds the model, swaps in QuantLinear modules before the
weights load (so the packed tensors load into them by name) and sets the INT4-KV attention.
"""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .nn import attention

    attention.register()

    class FireqConfig(QuantizationConfigMixin):
        """The checkpoint's quantization_config, kept as given (see fireq.checkpoint.format)."""

        def __init__(self, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = "fireq"
            self._fields = dict(kwargs)
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return {"quant_method": "fireq", **self._fields}

        def to_diff_dict(self):
            return self.to_dict()

    class FireqHfQuantizer(HfQuantizer):
        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            return None

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .checkpoint.load import swap_modules

            dtype = next(model.parameters()).dtype
            swap_modules(model, self.quantization_config.to_dict(), dtype)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .checkpoint.load import _use_int4_cache_in_generate
            from .pipeline import set_attention_impl

            set_attention_impl(model)
            _use_int4_cache_in_generate(model)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    if "fireq" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("fireq")(FireqConfig)
    if "fireq" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("fireq")(FireqHfQuantizer)
    _done = True


__all__ = ["register"]
