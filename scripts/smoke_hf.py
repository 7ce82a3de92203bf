"""Smoke test of the transformers integration on whatever transformers/torch is installed (e.g. the GPU
machine's 5.17): tiny random Llama and Gemma 3 models are quantized, saved, loaded with fireq.load and
AutoModelForCausalLM.from_pretrained, run (Triton kernels on an FP8 GPU) and generate.

    python scripts/smoke_hf.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import fireq
    from fireq import recipe as recipes
    from fireq.checkpoint.save import save_checkpoint
    from fireq.pipeline import quantize_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print("transformers", transformers.__version__, "torch", torch.__version__, "device", args.device)
    archs = {
        "llama": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=1000),
        "gemma3_text": dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=256, num_hidden_layers=2, vocab_size=1000, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"]),
    }
    for arch, kw in archs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw), dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.05)
        quantize_model(model, recipes.load("rtn"))
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "ckpt")
            os.mkdir(out)
            save_checkpoint(model, None, recipes.load("rtn"), __import__("pathlib").Path(out), source=arch)
            x = torch.randint(0, 1000, (2, 24))
            ref = fireq.load(out, device="cpu")(x).logits
            m1 = fireq.load(out, device=args.device)
            m2 = AutoModelForCausalLM.from_pretrained(out, dtype=m1.dtype).to(args.device)
            with torch.no_grad():
                a = m1(x.to(args.device)).logits.float().cpu()
                b = m2(x.to(args.device)).logits.float().cpu()
            rel = ((a - ref).norm() / ref.norm()).item()
            with torch.no_grad():  # float32 on the device: the Triton path against the CPU reference path
                c = fireq.load(out, device=args.device, dtype=torch.float32)(x.to(args.device)).logits.cpu()
            rel32 = ((c - ref).norm() / ref.norm()).item()
            gen = m1.generate(x[:1].to(args.device), max_new_tokens=6, do_sample=False)
            print(f"{arch}: fireq.load == from_pretrained: {torch.equal(a, b)}; {args.device} ({m1.dtype}) vs CPU "
                  f"float32 reference rel err {rel:.3e} (float32 on {args.device}: {rel32:.3e}); generate -> {tuple(gen.shape)}; "
                  f"q_proj {type(m2.model.layers[0].self_attn.q_proj).__name__}")
            assert torch.equal(a, b) and torch.isfinite(a).all() and gen.shape == (1, 30)
            # on an FP8 GPU the linears hold the kernel's weight layout; state_dict() still gives the file's
            from safetensors.torch import load_file

            name = "model.layers.0.self_attn.q_proj.qweight"
            disk = load_file(os.path.join(out, "model.safetensors"))[name]
            lay = m1.model.layers[0].self_attn.q_proj._layout_block
            assert torch.equal(m1.state_dict()[name].cpu(), disk)
            print(f"  q_proj layout block {lay}; state_dict qweight == file: True")
            # token-by-token decoding through the INT4 cache (in-place buffers, packed views handed to the
            # kernel) against one forward over the whole sequence
            from fireq.nn.attention import make_cache

            def incremental_vs_full(m, max_len=None):
                cache = make_cache(m, max_len)
                xs = x.to(args.device)
                with torch.no_grad():
                    full = m(xs, use_cache=False).logits.float()
                    steps = [m(xs[:, :5], past_key_values=cache, use_cache=True).logits.float()]
                    for t in range(5, xs.shape[1]):
                        steps.append(m(xs[:, t:t + 1], past_key_values=cache, use_cache=True).logits.float())
                inc = torch.cat(steps, dim=1)
                per_pos = ((inc - full).norm(dim=-1) / full.norm(dim=-1)).flatten()
                return ((inc - full).norm() / full.norm()).item(), per_pos.median().item(), \
                    tuple(cache.layers[0]._buf[0].packed.shape)

            rel_inc, _, buf = incremental_vs_full(m1)
            rel_inc32, med32, _ = incremental_vs_full(fireq.load(out, device=args.device, dtype=torch.float32))
            print(f"  incremental decode through the INT4 cache vs full forward: rel err {rel_inc:.2e} "
                  f"({m1.dtype}), {rel_inc32:.2e} (float32; median position {med32:.1e}) (cache buffers {buf})")
            # these tiny random models turn float noise into FP8 rounding flips of activations. On the CPU
            # (one reference path, float noise ~1e-7) only a position or two differ (in float64 the two
            # agree to 1e-8), so most positions must agree; on the GPU the prefill and decode kernels
            # round differently (FP8 MMAs, split-KV) and flips are everywhere: there the two must agree
            # at least as well as the device's float32 model agrees with the CPU reference
            assert med32 < 1e-3 or rel_inc32 <= rel32, (med32, rel_inc32, rel32)
            # the static cache (whole buffers, device-side lengths: what CUDA-graph decoding uses)
            m32 = fireq.load(out, device=args.device, dtype=torch.float32)
            rel_st32, med_st32, buf = incremental_vs_full(m32, max_len=40)
            print(f"  static INT4 cache: incremental vs full rel err {rel_st32:.2e} (float32; median position "
                  f"{med_st32:.1e}) (cache buffers {buf})")
            assert med_st32 < 1e-3 or rel_st32 <= rel32, (med_st32, rel_st32, rel32)
            if args.device == "cuda":
                from fireq.nn.graphs import GraphDecoder

                g = GraphDecoder(m1, 1, 40).generate(x[:1].to(args.device), 6)
                print(f"  GraphDecoder (CUDA graphs) greedy tokens == generate(): {torch.equal(g, gen)}")
                assert g.shape == gen.shape
    print("smoke ok")


if __name__ == "__main__":
    main()
