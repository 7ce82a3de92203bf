"""`fireq inspect`: plots and stats of per-channel magnitudes before and after the recipe's transforms."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fireq.cli import app

pytest.importorskip("matplotlib")
runner = CliRunner()


def test_inspect_writes_plots(tiny_dirs, calib_file, tmp_path):
    out = tmp_path / "plots"
    r = runner.invoke(app, ["inspect", str(tiny_dirs["llama"]), "--out", str(out), "--calib-data", str(calib_file),
                            "--nsamples", "2", "--layers", "1"])
    assert r.exit_code == 0, r.output
    assert (out / "summary.png").stat().st_size > 1000 and (out / "layer_1.png").stat().st_size > 1000
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["layers"]) == 2
    keys = stats["layers"][0]["keys_pre_rope"]
    # the default recipe scales keys before RoPE (they change); smoothing is off: activations stay
    assert keys["after_max"] != pytest.approx(keys["before_max"], rel=1e-3)
    a = stats["layers"][0]["down_in"]
    assert a["after_max"] == pytest.approx(a["before_max"], rel=1e-5)


def test_inspect_bad_layers(tiny_dirs, calib_file, tmp_path):
    r = runner.invoke(app, ["inspect", str(tiny_dirs["llama"]), "--out", str(tmp_path / "p"), "--calib-data",
                            str(calib_file), "--nsamples", "1", "--layers", "7"])
    assert r.exit_code != 0 and "fireq: error: --layers" in r.output and "Traceback" not in r.output


def test_inspect_takes_the_checkpoints_recipe(tiny_dirs, calib_file, tmp_path):
    from fireq import recipe as recipes
    from fireq.pipeline import run

    ck = tmp_path / "ck"
    r = recipes.load("rtn").replace(calib_data=str(calib_file), nsamples=2, seqlen=32, smooth_alpha=0.5)
    run(str(tiny_dirs["llama"]), str(ck), r)
    out = tmp_path / "plots"
    res = runner.invoke(app, ["inspect", str(tiny_dirs["llama"]), "--checkpoint", str(ck), "--out", str(out),
                              "--calib-data", str(calib_file), "--nsamples", "2"])
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["recipe"]["smooth_alpha"] == 0.5
    a = stats["layers"][0]["down_in"]  # smoothing moved the down_proj inputs' outliers into the weights
    assert a["after_max_over_median"] < a["before_max_over_median"]
