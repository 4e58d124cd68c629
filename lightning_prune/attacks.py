"""Adversarial attacks for robustness checks of pruned models: FGSM, PGD (L∞) and Carlini–Wagner (L2).

Pure torch, no extra dependency. Every attack takes a model that maps inputs to class logits, a batch of
inputs ``x`` in the box ``[low, high]`` and integer labels ``y``, and returns adversarial inputs of the same
shape, inside the box. The model is used as given (put it in eval mode first); its parameters get no
gradients. The SNIP-it seed evaluates pruned models with foolbox's ``L2CarliniWagnerAttack``
(``--attack CarliniWagner``) and reports the attack's success rate per L2 budget ε; :func:`robust_accuracy`
gives the complement on correctly classified inputs.

- :func:`fgsm`: one step ``x + ε · sign(∇ₓ CE)`` (Goodfellow et al. 2015, arXiv:1412.6572).
- :func:`pgd`: ``steps`` such steps of size ``step_size``, each projected back onto the ε ball and the box
  (Madry et al. 2018, arXiv:1706.06083).
- :func:`carlini_wagner_l2`: the smallest L2 perturbation found by the tanh-box reparametrisation, Adam on
  ``‖δ‖² + c · max(Z_y − max_{i≠y} Z_i, −κ)`` and a per-example binary search on ``c`` (Carlini & Wagner
  2017, arXiv:1608.04644).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lightning_prune._validate import integer, invalid, number

Model = Callable[[torch.Tensor], torch.Tensor]
ATTACKS = ("fgsm", "pgd", "carlini_wagner")


def _check_box(owner: str, low: float, high: float) -> tuple[float, float]:
    low = number(owner, "low", low)
    high = number(owner, "high", high, low=low, low_open=True)
    return low, high


def _check_inputs(owner: str, x: torch.Tensor, y: torch.Tensor, low: float, high: float) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise invalid(owner, "x", type(x).__name__, "a floating-point tensor with a batch dimension")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise invalid(owner, "y", shape, f"a tensor of int64 labels of shape {tuple(x.shape[:1])}")
    if x.numel() and (x.min() < low or x.max() > high):
        value = (float(x.min()), float(x.max()))
        raise invalid(owner, "x", value, f"inside the box [low, high] = [{low}, {high}] (its min and max)")


def _input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∂ CE(model(x), y) / ∂x`` (summed over the batch), without touching parameter gradients."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, low: float = 0.0, high: float = 1.0
) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(x + eps · sign(∂ CE / ∂x), low, high)``.

    Args:
        model: Inputs → class logits.
        x: Inputs in ``[low, high]``.
        y: Labels (int64), one per input.
        eps: L∞ budget (>= 0).
        low: Lower bound of the input box.
        high: Upper bound of the input box.

    Returns:
        The adversarial inputs (detached).

    Raises:
        PruningError: For an invalid argument.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        >>> fgsm(model, torch.tensor([[0.5, 0.5]]), torch.tensor([0]), eps=0.1)
        tensor([[0.4000, 0.6000]])
    """
    eps = number("fgsm", "eps", eps, low=0.0)
    return _pgd("fgsm", model, x, y, eps, 1, eps, False, None, low, high)


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Projected gradient descent in the L∞ ball: FGSM steps, each projected onto the ball and the box.

    Args:
        model: Inputs → class logits.
        x: Inputs in ``[low, high]``.
        y: Labels (int64), one per input.
        eps: L∞ budget (>= 0).
        steps: Gradient steps (>= 1).
        step_size: Size of each step (> 0); default ``2.5 · eps / steps`` (Madry et al.).
        random_start: Start from a uniform point of the ball instead of ``x``.
        generator: Random generator of the start (CPU); default: torch's global one.
        low: Lower bound of the input box.
        high: Upper bound of the input box.

    Returns:
        The adversarial inputs (detached), within ``eps`` of ``x`` in every entry and inside the box.

    Raises:
        PruningError: For an invalid argument.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        >>> pgd(model, torch.tensor([[0.5, 0.95]]), torch.tensor([0]), eps=0.1, random_start=False)
        tensor([[0.4000, 1.0000]])
    """
    eps = number("pgd", "eps", eps, low=0.0)
    steps = integer("pgd", "steps", steps, low=1)
    if step_size is None:
        step_size = 2.5 * eps / steps
    else:
        step_size = number("pgd", "step_size", step_size, low=0.0, low_open=True)
    if not isinstance(random_start, bool):
        raise invalid("pgd", "random_start", random_start, "a bool (True or False)")
    return _pgd("pgd", model, x, y, eps, steps, step_size, random_start, generator, low, high)


def _pgd(
    owner: str,
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator | None,
    low: float,
    high: float,
) -> torch.Tensor:
    """PGD with checked budgets; FGSM is its one step of size ``eps`` from ``x``."""
    low, high = _check_box(owner, low, high)
    _check_inputs(owner, x, y, low, high)
    x = x.detach()
    lo, hi = (x - eps).clamp(min=low), (x + eps).clamp(max=high)
    adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        adv = torch.maximum(torch.minimum(x + (2 * noise - 1) * eps, hi), lo)
    for _ in range(steps):
        adv = adv + step_size * _input_gradient(model, adv, y).sign()
        adv = torch.maximum(torch.minimum(adv, hi), lo)
    return adv.detach()


def carlini_wagner_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    confidence: float = 0.0,
    initial_const: float = 1e-3,
    binary_steps: int = 9,
    steps: int = 100,
    lr: float = 1e-2,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Carlini–Wagner L2 attack (untargeted): the smallest perturbation found that changes the prediction.

    The input is reparametrised as ``x' = low + (high − low) · (tanh(w) + 1) / 2`` so it stays inside the box;
    for each constant ``c``, ``steps`` Adam steps on ``w`` minimise ``‖x' − x‖₂² + c · max(Z_y − max_{i≠y}
    Z_i, −confidence)`` (``Z``: logits). Per example, ``c`` follows a binary search (×10 while no
    adversarial is found, then bisection), and the adversarial example of smallest L2 distance over all
    steps is kept. The defaults of ``binary_steps``, ``initial_const``, ``lr`` and ``confidence`` are
    foolbox's (the seed's attack); its ``steps=10000`` is shortened to 100, enough on small models.

    Args:
        model: Inputs → class logits.
        x: Inputs in ``[low, high]``.
        y: Labels (int64), one per input.
        confidence: Margin κ (>= 0) by which the adversarial class must win.
        initial_const: First ``c`` (> 0).
        binary_steps: Values of ``c`` tried per example (>= 1).
        steps: Adam steps per value of ``c`` (>= 1).
        lr: Adam's learning rate (> 0).
        low: Lower bound of the input box.
        high: Upper bound of the input box.

    Returns:
        The adversarial inputs (detached); ``x`` itself where none was found, or where the model already
        misclassifies ``x`` (distance 0).

    Raises:
        PruningError: For an invalid argument.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        ...     _ = model.bias.copy_(torch.tensor([0.1, -0.1]))
        >>> x = torch.tensor([[0.5, 0.5]])
        >>> adv = carlini_wagner_l2(model, x, torch.tensor([0]), steps=200)
        >>> round((adv - x).norm().item(), 2)  # the closed form: margin 0.2 / ‖w₁ − w₀‖ (= 2√2)
        0.07
    """
    owner = "carlini_wagner_l2"
    low, high = _check_box(owner, low, high)
    confidence = number(owner, "confidence", confidence, low=0.0)
    initial_const = number(owner, "initial_const", initial_const, low=0.0, low_open=True)
    binary_steps = integer(owner, "binary_steps", binary_steps, low=1)
    steps = integer(owner, "steps", steps, low=1)
    lr = number(owner, "lr", lr, low=0.0, low_open=True)
    _check_inputs(owner, x, y, low, high)
    x = x.detach()
    n = x.shape[0]
    reduce = tuple(range(1, x.dim()))

    def to_input(w: torch.Tensor) -> torch.Tensor:
        return low + (high - low) * (torch.tanh(w) + 1) / 2

    def margin(logits: torch.Tensor) -> torch.Tensor:  # Z_y − max_{i≠y} Z_i
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return true - other

    with torch.no_grad():
        best = x.clone()
        best_norm = torch.where(margin(model(x)) < 0, 0.0, math.inf).to(x.device)
    w0 = torch.atanh(((x - low) / (high - low) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    const = torch.full((n,), initial_const, device=x.device)
    lower = torch.zeros(n, device=x.device)
    upper = torch.full((n,), math.inf, device=x.device)
    for _ in range(binary_steps):
        w = w0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(steps):
            with torch.enable_grad():
                adv = to_input(w)
                distance = (adv - x).pow(2).sum(reduce)
                m = margin(model(adv))
                loss = (distance + const * (m + confidence).clamp(min=0)).sum()
                optimizer.zero_grad()
                (grad,) = torch.autograd.grad(loss, w)
            w.grad = grad
            optimizer.step()
            with torch.no_grad():  # the point just evaluated (before the step)
                success = m < 0
                norm = distance.sqrt()
                better = success & (norm < best_norm)
                best[better] = adv[better].detach()
                best_norm = torch.where(better, norm, best_norm)
                found |= success
        with torch.no_grad():
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < math.inf, (lower + upper) / 2, const * 10)
    return best.detach()


def robust_accuracy(
    model: Model,
    x: torch.Tensor,
    adversarial: torch.Tensor,
    y: torch.Tensor,
    eps: float | None = None,
    norm: str = "l2",
) -> tuple[int, int]:
    """Count the inputs the model classifies correctly, clean and under attack.

    An input counts as robust if the model classifies it correctly and also classifies its adversarial
    example correctly, or that example lies farther than ``eps`` from it in the given norm (for a
    minimum-norm attack such as :func:`carlini_wagner_l2`, evaluated at several ``eps`` from one run).

    Args:
        model: Inputs → class logits.
        x: Clean inputs.
        adversarial: Their adversarial examples (same shape).
        y: Labels.
        eps: Budget; ``None``: any distance counts.
        norm: ``"l2"`` or ``"linf"``, the norm ``eps`` is measured in.

    Returns:
        ``(clean_correct, robust_correct)``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        ...     _ = model.bias.zero_()
        >>> x = torch.tensor([[0.5, 0.4], [0.5, 0.6]])
        >>> adv = torch.tensor([[0.5, 0.6], [0.5, 0.6]])  # the first flips to class 1, 0.2 away
        >>> robust_accuracy(model, x, adv, torch.tensor([0, 1]), eps=0.1)
        (2, 2)
        >>> robust_accuracy(model, x, adv, torch.tensor([0, 1]), eps=0.5)
        (2, 1)
    """
    if norm not in ("l2", "linf"):
        raise invalid("robust_accuracy", "norm", norm, "one of ['l2', 'linf']")
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        held = model(adversarial).argmax(1) == y
        if eps is not None:
            delta = (adversarial - x).flatten(1)
            distance = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
            held |= distance > eps * (1 + 1e-6)
    return int(clean.sum()), int((clean & held).sum())


def check_epsilons(owner: str, epsilons: Sequence[float]) -> tuple[float, ...]:
    """A non-empty sequence of finite budgets >= 0, as a tuple of floats."""
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, Sequence) or not epsilons:
        raise invalid(owner, "epsilons", epsilons, "a non-empty list of numbers >= 0")
    return tuple(number(owner, "epsilons", e, low=0.0) for e in epsilons)
