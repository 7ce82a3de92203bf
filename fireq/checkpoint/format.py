"""The checkpoint format, version 1.

A directory with
  config.json            the model's transformers config plus `quantization_config` (below)
  model.safetensors      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
  tokenizer files, generation_config.json, README.md (model card with the recipe)

Tensors of each quantized linear `P` (every q/k/v/o/gate/up/down projection of every decoder layer):
  P.qweight          (N, ceil(K/2)) uint8: INT4 two's complement, two a byte along K, even k low nibble
  P.scales           (N, ceil(K/g)) float8_e4m3fn or bfloat16: one scale per group of g inputs; the last
                     group is shorter when g does not divide K
  P.log2_multiplier  (1,) int32: e; the weight is W = q * scale / 2^e
  P.bias             (N,) when the layer has one
Attention modules with post-RoPE scaling carry `self_attn.k_post_scale` (H_kv, head_dim) float32:
K is multiplied by it after RoPE, Q divided by it, before quantization.
Every other tensor (embeddings, norms, lm_head) is stored as in a float checkpoint; with
`rotate_residual` the embeddings and lm_head are stored rotated and untied (tie_word_embeddings false).

At run time, not on disk: on an FP8 GPU each QuantLinear repacks qweight into the GEMM kernel's layout
(fireq_kernels.gemm_w4a8.repack_half: K padded to whole 128-channel blocks, byte j of a block holding
channels j and j + 64), and state_dict() gives this layout back. The INT4 KV cache packs each channel
group's halves into the two nibbles of a byte (fireq.formats.kv).

quantization_config:
  quant_method: "fireq", format_version: 1,
  weights: {bits: 4, group_size, symmetric: true, scale_dtype, packing: "uint8_lo_first"},
  activations: {dtype: "float8_e4m3fn" | null, granularity: "per_token"},
  queries: {dtype: "float8_e4m3fn" | null, granularity: "per_token_per_head"},
  kv_cache: {bits, group_size, symmetric, scale_dtype},
  post_rope_scaling: bool, modules: [names of quantized linears], recipe: {...}
"""

from __future__ import annotations

FORMAT_VERSION = 1
QUANT_METHOD = "fireq"
LINEAR_TENSORS = ("qweight", "scales", "log2_multiplier")


def quantization_config(recipe, modules: list[str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weights": {"bits": 4, "group_size": recipe.w_group_size, "symmetric": True,
                    "scale_dtype": recipe.w_scale_dtype, "packing": "uint8_lo_first"},
        "activations": {"dtype": "float8_e4m3fn" if recipe.act_quant else None, "granularity": "per_token"},
        "queries": {"dtype": "float8_e4m3fn" if recipe.query_fp8 else None, "granularity": "per_token_per_head"},
        "kv_cache": {"bits": recipe.kv_bits, "group_size": recipe.kv_group_size, "symmetric": recipe.kv_symmetric,
                     "scale_dtype": recipe.kv_scale_dtype},
        "post_rope_scaling": recipe.post_rope_scaling,
        "modules": modules,
        "recipe": recipe.to_dict(),
    }
