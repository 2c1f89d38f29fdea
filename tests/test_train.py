"""The training study's building blocks (dcgraph.train): the claims that can be tested fast."""

import json

import pytest
import torch

from dcgraph import cli
from dcgraph.train import TrainConfig, build_model, load_data, train


@pytest.fixture(scope="module")
def data():
    return load_data()


def test_data_split(data):
    xtr, _, xte, yte = data
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std().item() - 1) < 1e-3
    counts = torch.bincount(yte, minlength=10)
    assert counts.min() >= 35  # stratified: every class in the test split


@pytest.mark.parametrize("norm", ["deepcontrol", "deepcontrol_frozen_a"])
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_deep_control_is_the_same_model_in_train_and_eval(norm, depth, data):
    torch.manual_seed(0)
    model = build_model(norm, depth)
    with torch.no_grad():
        for m in model.modules():  # move a, g, b away from their initial values
            if hasattr(m, "a"):
                m.a.uniform_(0.2, 1.0), m.g.uniform_(0.5, 1.5), m.b.normal_()
    x = data[0][:16]
    assert torch.equal(model.train()(x), model.eval()(x))
    # no batch statistics: a sample alone gives its in-batch output (up to the conv's rounding)
    torch.testing.assert_close(model.train()(x[:1]), model.eval()(x)[:1], rtol=1e-5, atol=1e-6)


def test_batchnorm_is_not(data):
    torch.manual_seed(0)
    model = build_model("batchnorm", "shallow")
    x = data[0][:16]
    model.train()(x)  # update the running statistics once
    assert not torch.allclose(model.train()(x), model.eval()(x))


def test_deep_control_trains_at_batch_size_one(data):
    """One epoch of single-sample SGD; chance is 0.1. The threshold is loose on purpose."""
    result = train(TrainConfig("deepcontrol", batch_size=1, depth="shallow", epochs=1, seed=0),
                   data=data)
    assert result.test_accuracy > 0.5, result.curve


def test_reproducible(data):
    cfg = TrainConfig("deepcontrol", batch_size=32, depth="shallow", epochs=1, seed=3)
    a, b = train(cfg, data=data), train(cfg, data=data)
    assert a.curve == b.curve and a.test_accuracy == b.test_accuracy


def test_saved_bytes_deep_control_vs_batchnorm(data):
    dc = train(TrainConfig("deepcontrol", 32, "deep", 1, evals_per_epoch=1), data=data)
    bn = train(TrainConfig("batchnorm", 32, "deep", 1, evals_per_epoch=1), data=data)
    assert dc.saved_bytes_per_step <= 0.55 * bn.saved_bytes_per_step


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="norm="):
        TrainConfig(norm="layernorm").check()
    with pytest.raises(ValueError, match="depth="):
        TrainConfig(depth="medium").check()


def test_cli_train_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["train", "--norm", "groupnorm", "--epochs", "1", "--json", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["norm"] == "groupnorm" and 0 <= result["test_accuracy"] <= 1
    assert result["curve"] and result["saved_bytes_per_step"] > 0
