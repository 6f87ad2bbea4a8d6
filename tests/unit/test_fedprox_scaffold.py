"""FedProx's proximal term and SCAFFOLD's site-side control updates against numpy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fl.client.fedprox import PTFedProxLoss
from fl.client.scaffold import (
    C_DIFF_PREFIX,
    C_GLOBAL_PREFIX,
    PTScaffoldHelper,
    get_lr_values,
    split_controls,
    with_control_diff,
)


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def numpy_params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: p.detach().numpy().astype(np.float64) for k, p in model.named_parameters()}


def test_fedprox_is_half_mu_times_squared_distance():
    local, global_model = small_model(1), small_model(2)
    expected = (
        0.3
        / 2
        * sum(
            np.sum((a - b) ** 2)
            for a, b in zip(numpy_params(local).values(), numpy_params(global_model).values(), strict=True)
        )
    )
    loss = PTFedProxLoss(mu=0.3)(local, global_model)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_fedprox_gradient_pulls_toward_the_global_model():
    local, global_model = small_model(1), small_model(2)
    PTFedProxLoss(mu=2.0)(local, global_model).backward()
    for (name, p), g in zip(local.named_parameters(), global_model.parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), 2.0 * (p - g).detach().numpy(), rtol=1e-6, err_msg=name)
    assert all(g.grad is None for g in global_model.parameters())


@pytest.mark.parametrize("mu", [-0.1, float("nan"), True])
def test_fedprox_refuses_a_bad_mu(mu):
    with pytest.raises(ValueError, match="mu"):
        PTFedProxLoss(mu)


def test_fedprox_refuses_models_of_different_shapes():
    with pytest.raises(ValueError, match="shape"):
        PTFedProxLoss(0.1)(nn.Linear(3, 2), nn.Linear(4, 2))


def test_scaffold_round_matches_the_option_ii_reference():
    model = small_model(3)
    helper = PTScaffoldHelper()
    helper.init(model)
    rng = np.random.default_rng(0)
    c_global = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in model.named_parameters()}
    helper.load_global_controls(c_global)
    global_model = copy.deepcopy(model)
    x_global = numpy_params(global_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    (lr,) = get_lr_values(optimizer)

    c_g, c_l = helper.get_params()
    steps = 3
    y = {k: v.copy() for k, v in x_global.items()}  # numpy replay of the same steps
    data = torch.randn(8, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).pow(2).mean().backward()
        grads = {k: p.grad.numpy().astype(np.float64) for k, p in model.named_parameters()}
        optimizer.step()
        helper.model_update(model, lr, c_g, c_l)
        for k in y:  # c_local starts at 0
            y[k] = y[k] - lr * grads[k] - lr * c_global[k]
        np.testing.assert_allclose(numpy_params(model)["0.weight"], y["0.weight"], rtol=1e-4, atol=1e-6)
        y = numpy_params(model)  # resync float32 rounding before the next step
    helper.terms_update(model, lr, c_g, c_l, global_model)

    delta = helper.get_delta_controls()
    for k in x_global:
        expected_new_local = 0.0 - c_global[k] + (x_global[k] - y[k]) / (steps * lr)
        np.testing.assert_allclose(delta[k], expected_new_local, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(helper.c_local[k].numpy(), expected_new_local, rtol=1e-4, atol=1e-4)
    assert set(delta) == {k for k, _ in model.named_parameters()}  # BatchNorm buffers have no control


def test_frozen_parameters_get_no_correction_and_no_control_change():
    model = small_model(4)
    model[0].weight.requires_grad_(False)
    helper = PTScaffoldHelper()
    helper.init(model)
    helper.load_global_controls({"0.weight": np.ones((3, 4), np.float32), "2.bias": np.ones(2, np.float32)})
    before = model[0].weight.detach().clone()
    c_g, c_l = helper.get_params()
    helper.model_update(model, 0.1, c_g, c_l)
    assert torch.equal(model[0].weight, before)
    helper.terms_update(model, 0.1, c_g, c_l, copy.deepcopy(model))
    assert "0.weight" not in helper.get_delta_controls()


def test_controls_of_the_wrong_shape_or_name_are_refused():
    model = small_model(5)  # the helper holds it by weak reference only, as FLARE's
    helper = PTScaffoldHelper()
    helper.init(model)
    with pytest.raises(ValueError, match="shape"):
        helper.load_global_controls({"0.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="lacks"):
        helper.load_global_controls({"nope": np.zeros(1, np.float32)})


def test_terms_update_needs_a_model_update_first():
    model = small_model(6)
    helper = PTScaffoldHelper()
    helper.init(model)
    c_g, c_l = helper.get_params()
    with pytest.raises(RuntimeError, match="model_update"):
        helper.terms_update(model, 0.1, c_g, c_l, model)
    with pytest.raises(ValueError, match="terms_update"):
        helper.get_delta_controls()


def test_control_tensors_travel_under_their_prefixes():
    params = {"w": 1, C_GLOBAL_PREFIX + "w": 2}
    model_params, controls = split_controls(params)
    assert model_params == {"w": 1} and controls == {"w": 2}
    assert with_control_diff({"w": 1}, {"w": 3}) == {"w": 1, C_DIFF_PREFIX + "w": 3}
