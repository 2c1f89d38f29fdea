"""Mean Shift Rejection (dcgraph.mean_shift) and the training study's recipe options."""

import pytest
import torch
from torch import nn

from dcgraph.mean_shift import filter_means, reject_mean_shift, zero_mean_init_
from dcgraph.nn import DeepControlConv2d
from dcgraph.train import TrainConfig, build_model, load_data, split_validation, train


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         DeepControlConv2d(8, 8, 3, padding=1, act="relu"),
                         nn.Conv2d(8, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(5))


@pytest.mark.parametrize("gain", [1.0, 2.0 ** 0.5])
def test_zero_mean_init_has_zero_mean_and_the_norm_per_output_channel(gain):
    model = _model()
    assert zero_mean_init_(model, gain=gain) == 3
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, DeepControlConv2d)):
            w = m.weight.detach().flatten(1)
            assert w.mean(1).abs().max() < 1e-6
            torch.testing.assert_close(w.norm(dim=1), torch.full((w.shape[0],), gain))


def test_hook_keeps_filters_zero_mean_under_sgd_momentum_and_leaves_the_rest_alone():
    model = _model()
    x = torch.randn(4, 3, 6, 6)
    model(x)  # materialise the lazy linear
    zero_mean_init_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = reject_mean_shift(opt)
    linear = model[-1].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        lin_grad = model[-1].weight.grad.clone()
        opt.step()
    assert filter_means(model) < 1e-6
    # the linear layer moved by its own (uncentred) gradient
    assert not torch.allclose(model[-1].weight, linear) and lin_grad.mean().abs() > 0
    # without the hook, the filters drift away from zero mean
    handle.remove()
    for _ in range(5):
        opt.zero_grad()
        (model(x) + 1).square().mean().backward()
        opt.step()
    assert filter_means(model) > 1e-4


def test_validation_split_is_stratified_disjoint_and_fixed():
    xtr, ytr, _, _ = load_data()
    a = split_validation(xtr, ytr, 0.2)
    b = split_validation(xtr, ytr, 0.2)
    assert len(a[3]) == 288 and len(a[1]) == 1149
    assert torch.equal(a[3], b[3]) and torch.equal(a[2], b[2])
    assert set(torch.bincount(a[3]).tolist()) <= {28, 29, 30}  # ~29 per class of 10
    rows = {tuple(r.flatten().tolist()) for r in a[0]}
    assert not any(tuple(r.flatten().tolist()) in rows for r in a[2][:50])


def test_recipe_options_train_and_report_validation():
    cfg = TrainConfig("deepcontrol", 32, "shallow", 1, 0, 0.05, init="zero_mean_he", msr=True,
                      val_fraction=0.2)
    result = train(cfg.check())
    assert result.val_accuracy is not None and 0.0 <= result.test_accuracy <= 1.0
    assert result.config["init"] == "zero_mean_he" and result.config["msr"]
    model = build_model("none", "deep", "zero_mean")
    assert filter_means(model) < 1e-6


def test_bad_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="init="):
        TrainConfig(init="orthogonal").check()
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=0.7).check()
