"""Example inputs: one convention for calling a model, used by every part of the package."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningError

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def call_model(model: nn.Module, example_inputs: ExampleInputs, *, compiled: bool = False) -> Any:
    """Call ``model``: a tensor is one argument, a tuple/list positional arguments, a dict keywords.

    Eagerly unless ``compiled`` (see :func:`eager`): analysis relies on hooks and autograd records that
    compiled code does not show; only latency measurements run compiled code as it is.
    """
    args, kwargs = call_arguments(example_inputs)
    with contextlib.nullcontext() if compiled else eager():
        return model(*args, **kwargs)


def call_arguments(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``example_inputs`` stand for (see :func:`call_model`)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def eager() -> contextlib.AbstractContextManager:
    """A context in which ``torch.compile``d code runs eagerly.

    Forward hooks added after compilation are invisible to compiled code, so node gates would see no
    gradient and traces would miss layers. Scoring, tracing and measuring therefore run the module's
    own Python code. (``torch.compiler.set_stance``, torch >= 2.6; on older versions a no-op.)
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


def describe(example_inputs: ExampleInputs) -> str:
    """A short description of the inputs' shapes for error messages."""
    if isinstance(example_inputs, torch.Tensor):
        return f"tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, Mapping):
        inner = ", ".join(f"{k}: {describe(v)}" for k, v in example_inputs.items())
        return "{" + inner + "}"
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return "(" + ", ".join(describe(v) for v in example_inputs) + ")"
    return type(example_inputs).__name__


def check_module(model: Any, func: str) -> nn.Module:
    """Raise a clear error unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise PruningError(
            f"`{func}(model=...)` is invalid: `model` must be a torch.nn.Module; got {type(model).__name__}."
        )
    return model


def check_inputs(example_inputs: Any, func: str) -> ExampleInputs:
    """Raise a clear error unless ``example_inputs`` is a tensor, a sequence or a mapping of them."""
    ok = isinstance(example_inputs, torch.Tensor | Mapping) or (
        isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str)
    )
    if not ok:
        raise PruningError(
            f"`{func}(example_inputs=...)` is invalid: it must be a tensor, a tuple/list of positional "
            f"arguments or a dict of keyword arguments; got {type(example_inputs).__name__}."
        )
    return example_inputs


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) model output, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for k in sorted(output) for t in flatten_outputs(output[k])]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [t for item in output for t in flatten_outputs(item)]
    return []


def to_device(example_inputs: ExampleInputs, device: torch.device | str) -> ExampleInputs:
    """Move every tensor in ``example_inputs`` to ``device``."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.to(device)
    if isinstance(example_inputs, Mapping):
        return {k: to_device(v, device) for k, v in example_inputs.items()}
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return type(example_inputs)(to_device(v, device) for v in example_inputs)
    return example_inputs
