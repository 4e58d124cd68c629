"""The attacks against closed forms on linear classifiers, and their invariants on small MLPs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_prune.attacks import carlini_wagner_l2, check_epsilons, fgsm, pgd, robust_accuracy
from lightning_prune.errors import PruningError


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def boundary_distance(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact L2 distance from each input to the region where the linear model does not predict ``y``.

    That region is the union of the half-spaces ``z_j >= z_y`` (j ≠ y), so the distance is the smallest
    distance to one of the hyperplanes: ``min_j (z_y − z_j) / ‖w_y − w_j‖``.
    """
    with torch.no_grad():
        z = model(x)
        w = model.weight
        out = []
        for zi, yi in zip(z, y, strict=True):
            out.append(min((zi[yi] - zi[j]) / (w[yi] - w[j]).norm() for j in range(len(zi)) if j != yi))
    return torch.stack(out)


# -- FGSM ------------------------------------------------------------------------------------------------
def test_fgsm_step_is_eps_times_the_sign_of_the_hand_computed_gradient():
    # two classes: ∂CE/∂x = (p − e_y)ᵀ W = ±p_other (w1 − w0), so its sign is ±sign(w1 − w0)
    model = linear([[0.3, -0.2, 0.5, 0.0], [-0.4, 0.1, 0.7, 0.0]], [0.0, 0.1])
    x = torch.full((2, 4), 0.5)
    y = torch.tensor([0, 1])
    adv = fgsm(model, x, y, eps=0.1)
    direction = torch.tensor([-1.0, 1.0, 1.0, 0.0])  # sign(w1 − w0); the last weight is equal: no gradient
    torch.testing.assert_close(adv[0] - x[0], 0.1 * direction)
    torch.testing.assert_close(adv[1] - x[1], -0.1 * direction)


def test_fgsm_clips_to_the_box_and_leaves_parameter_gradients_alone():
    model = linear([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])
    adv = fgsm(model, torch.tensor([[0.05, 0.98]]), torch.tensor([0]), eps=0.3)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0]]))
    assert model.weight.grad is None and model.bias.grad is None


# -- PGD -------------------------------------------------------------------------------------------------
def test_pgd_reaches_the_known_optimum_of_a_linear_model():
    # for a linear two-class model the worst point of the L∞ ball is its corner x + eps·sign(w_other − w_y)
    model = linear([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.7]], [0.0, 0.0])
    x = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.5]])
    y = torch.tensor([0, 0])
    adv = pgd(model, x, y, eps=0.2, steps=10, step_size=0.05, random_start=False)
    corner = (x + 0.2 * torch.tensor([-1.0, 1.0, 1.0])).clamp(0, 1)
    torch.testing.assert_close(adv, corner)
    # ... and it is at least as strong as FGSM: the margin it leaves is never larger
    with torch.no_grad():
        margin = lambda a: model(a)[:, 0] - model(a)[:, 1]  # noqa: E731
        assert (margin(adv) <= margin(fgsm(model, x, y, eps=0.2)) + 1e-6).all()


@given(
    eps=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
    random_start=st.booleans(),
    steps=st.integers(1, 4),
)
def test_pgd_stays_in_the_eps_ball_and_the_box(eps, seed, random_start, steps):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(5, 6)
    x[0] = 0.0  # on the box's faces
    x[1] = 1.0
    y = torch.randint(0, 3, (5,))
    generator = torch.Generator().manual_seed(seed)
    adv = pgd(model, x, y, eps, steps=steps, random_start=random_start, generator=generator)
    assert ((adv - x).abs() <= eps + 1e-6).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0


# -- Carlini-Wagner ----------------------------------------------------------------------------------------
def test_carlini_wagner_finds_the_closed_form_minimal_perturbation_of_a_linear_classifier():
    # three classes; the distance to the nearest decision boundary is known in closed form, and no
    # adversarial example can be closer (the boundaries are hyperplanes, far from the box's faces)
    model = linear([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.2, 0.1, -0.8, 0.3]], [0.1, -0.1, 0.0])
    x = torch.tensor([[0.55, 0.45, 0.5, 0.5], [0.45, 0.55, 0.5, 0.6], [0.4, 0.6, 0.5, 0.5]])
    y = model(x).argmax(1)
    assert y.tolist() == [0, 1, 1]
    exact = boundary_distance(model, x, y)
    adv = carlini_wagner_l2(model, x, y, steps=200)
    found = (adv - x).flatten(1).norm(dim=1)
    assert (model(adv).argmax(1) != y).all()
    assert (found >= exact - 1e-4).all()
    assert (found <= exact * 1.05).all(), (found, exact)


def test_carlini_wagner_returns_x_for_misclassified_inputs_and_when_it_fails():
    model = linear([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])
    x = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    y = torch.tensor([1, 0])  # the first is already misclassified: distance 0
    adv = carlini_wagner_l2(model, x, y, steps=5, binary_steps=1, initial_const=1e-6)
    torch.testing.assert_close(adv[0], x[0])
    # a constant of 1e-6 and 5 steps cannot move the second across a margin of 1.6: it stays x
    torch.testing.assert_close(adv[1], x[1])


def test_carlini_wagner_stays_in_the_box():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(4, 6)
    adv = carlini_wagner_l2(model, x, model(x).argmax(1), steps=20, binary_steps=3, low=0.0, high=1.0)
    assert adv.min() >= 0.0 and adv.max() <= 1.0


# -- counting and arguments --------------------------------------------------------------------------------
def test_robust_accuracy_counts_by_distance_in_either_norm():
    model = linear([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])
    x = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6]])
    adv = torch.tensor([[0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])  # only the first flips, L2 0.283, L∞ 0.2
    y = torch.tensor([0, 0, 0])  # the third is wrong already
    assert robust_accuracy(model, x, adv, y) == (2, 1)
    assert robust_accuracy(model, x, adv, y, eps=0.25) == (2, 2)  # 0.283 > 0.25: out of budget
    assert robust_accuracy(model, x, adv, y, eps=0.3) == (2, 1)
    assert robust_accuracy(model, x, adv, y, eps=0.19, norm="linf") == (2, 2)
    assert robust_accuracy(model, x, adv, y, eps=0.2, norm="linf") == (2, 1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x, y: fgsm(m, x, y, eps=-0.1), r"`fgsm\(eps=-0.1\)` is invalid: `eps` must be"),
        (lambda m, x, y: fgsm(m, x, y, eps=float("nan")), r"`fgsm\(eps=nan\)` is invalid"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, steps=0), r"`pgd\(steps=0\)` is invalid: `steps` must be"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, step_size=0), r"`pgd\(step_size=0\)` is invalid"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, random_start=1), r"`pgd\(random_start=1\)` is invalid"),
        (lambda m, x, y: fgsm(m, x, y.float(), eps=0.1), r"`fgsm\(y=\(2,\)\)` is invalid: `y` must be"),
        (lambda m, x, y: fgsm(m, x * 3, y, eps=0.1), r"`fgsm\(x=.*\)` is invalid: `x` must be inside"),
        (lambda m, x, y: fgsm(m, x, y, eps=0.1, low=1.0, high=0.0), r"`fgsm\(high=0.0\)` is invalid"),
        (lambda m, x, y: carlini_wagner_l2(m, x, y, binary_steps=0), r"`binary_steps` must be an int >= 1"),
        (lambda m, x, y: carlini_wagner_l2(m, x, y, lr=0.0), r"`carlini_wagner_l2\(lr=0.0\)` is invalid"),
        (lambda m, x, y: carlini_wagner_l2(m, x, y, confidence=-1), r"`confidence` must be a finite number"),
        (lambda m, x, y: robust_accuracy(m, x, x, y, norm="l1"), r"`norm` must be one of \['l2', 'linf'\]"),
    ],
)
def test_invalid_arguments_are_refused_with_the_call_and_the_value(call, match):
    model = linear([[1.0, -1.0], [-1.0, 1.0]], [0.0, 0.0])
    with pytest.raises(PruningError, match=match):
        call(model, torch.tensor([[0.6, 0.4], [0.4, 0.6]]), torch.tensor([0, 1]))


@pytest.mark.parametrize("value", [[], "0.1", [0.1, -0.2], None])
def test_check_epsilons_refuses_what_is_not_a_list_of_budgets(value):
    with pytest.raises(PruningError, match=r"`Owner\(epsilons=.*\)` is invalid"):
        check_epsilons("Owner", value)
