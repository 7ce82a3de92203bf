"""Bad input: one clear line, a non-zero exit, no traceback, nothing left in the output path."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from fireq.cli import app
from fireq.pipeline import run
from fireq import recipe as recipes

runner = CliRunner()


def _fails(args, out=None):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    text = r.output.strip()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("fireq: error:")]
    assert len(errors) == 1, text
    if out is not None:
        assert not out.exists() or not any(out.iterdir())
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "ckpt"
    run(str(tiny_dirs["llama"]), str(d), recipes.load("rtn"))
    return d


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert "no such file" in _fails(["quantize", tmp_path / "nope", "-o", out], out)
    assert "no such file" in _fails(["eval", tmp_path / "nope"])


def test_not_a_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.txt").write_text("hi")
    out = tmp_path / "out"
    assert "not a model directory" in _fails(["quantize", tmp_path / "m", "-o", out], out)
    assert "not a model" in _fails(["quantize", tmp_path / "m" / "x.txt", "-o", out], out)


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "out"
    msg = _fails(["quantize", d, "-o", out, "--recipe", "rtn"], out)
    assert "unsupported architecture 'gpt2'" in msg and "llama" in msg


def test_output_exists_not_empty(tmp_path, tiny_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--recipe", "rtn"])
    assert (out / "keep.txt").read_text() == "mine"


def test_calibration_file_empty_or_short(tmp_path, tiny_dirs):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--calib-data", empty], out)
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n")
    assert "fewer than one sequence" in _fails(
        ["quantize", tiny_dirs["llama"], "-o", out, "--calib-data", short, "--seqlen", "64"], out)


def test_seqlen_bounds(tmp_path, tiny_dirs, calib_file, ckpt):
    out = tmp_path / "out"
    assert "seqlen must be > 0" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--seqlen", "0"], out)
    assert "exceeds the model's 256 positions" in _fails(
        ["quantize", tiny_dirs["llama"], "-o", out, "--calib-data", calib_file, "--seqlen", "300",
         "--nsamples", "1"], out)
    assert "seqlen must be > 0" in _fails(["eval", ckpt, "--data", calib_file, "--seqlen", "-1"])
    assert "exceeds the model's 256 positions" in _fails(["eval", ckpt, "--data", calib_file, "--seqlen", "512"])


def test_prefill_fp8_option(tiny_dirs, calib_file, ckpt, tmp_path):
    assert "--prefill-fp8 must be >= 0" in _fails(["eval", ckpt, "--data", calib_file, "--seqlen", "16",
                                                   "--prefill-fp8", "-3"])
    assert "fireq checkpoints only" in _fails(["eval", tiny_dirs["llama"], "--data", calib_file, "--seqlen", "16",
                                               "--prefill-fp8", "8"])
    ppl = {}
    for n in (0, 8):  # 16-token windows: with 8, every linear call takes the FP8 path (its twin on the CPU)
        js = tmp_path / f"{n}.json"
        r = runner.invoke(app, ["eval", str(ckpt), "--data", str(calib_file), "--seqlen", "16", "--limit", "2",
                                "--prefill-fp8", str(n), "--json", str(js)])
        assert r.exit_code == 0 and "perplexity" in r.output, r.output
        ppl[n] = json.loads(js.read_text())
    assert ppl[8]["prefill_fp8_min_tokens"] == 8 and "prefill_fp8_min_tokens" not in ppl[0]
    assert ppl[8]["perplexity"] != ppl[0]["perplexity"]


def _copy(ckpt, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(ckpt, d)
    return d


def test_checkpoint_missing_tensor(tmp_path, ckpt, calib_file):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.qweight"]
    save_file(t, str(d / "model.safetensors"))
    assert "missing tensor model.layers.1.mlp.up_proj.qweight" in _fails(["eval", d, "--data", calib_file,
                                                                          "--seqlen", "16"])


def test_checkpoint_misshaped_tensor(tmp_path, ckpt, calib_file):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.qweight"] = t["model.layers.0.self_attn.q_proj.qweight"][:, :-1].contiguous()
    save_file(t, str(d / "model.safetensors"))
    assert "has shape" in _fails(["eval", d, "--data", calib_file, "--seqlen", "16"])


def test_checkpoint_corrupt(tmp_path, ckpt, calib_file):
    d = _copy(ckpt, tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    assert "corrupt" in _fails(["eval", d, "--data", calib_file, "--seqlen", "16"])


def test_checkpoint_unknown_version(tmp_path, ckpt, calib_file):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    assert "unknown fireq format version 99" in _fails(["eval", d, "--data", calib_file, "--seqlen", "16"])


def test_config_value_out_of_range(tmp_path, tiny_dirs):
    out = tmp_path / "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text("w_group_size: 7\n")
    assert "w_group_size" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--recipe", bad], out)
    bad.write_text("alpha_typo: 1\n")
    assert "unknown recipe key" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--recipe", bad], out)
    assert "w_group_size" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--w-group-size", "100"], out)
    assert "no recipe" in _fails(["quantize", tiny_dirs["llama"], "-o", out, "--recipe", "nonesuch"], out)


def test_interrupted_run_leaves_nothing(tmp_path, tiny_dirs, monkeypatch):
    """A failure while writing leaves no directory that looks complete."""
    import fireq.checkpoint.save as save

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "_model_card", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(str(tiny_dirs["llama"]), str(out), recipes.load("rtn"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
