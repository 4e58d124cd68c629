"""Model statistics: parameter counts, sparsity, multiply-accumulates and measured latency.

Pure torch (no Lightning): these functions report what pruning bought. :func:`model_stats` counts
parameters, non-zero parameters and the multiply-accumulates (MACs) of one forward pass;
:func:`measure_latency` times that forward on real hardware.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> stats = model_stats(nn.Linear(10, 5), torch.randn(2, 10))
    >>> stats.params, stats.macs
    (55, 100)
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune._inputs import (
    ExampleInputs,
    call_model,
    check_inputs,
    check_module,
    describe,
    flatten_outputs,
    to_device,
)
from lightning_prune.errors import PruningError

__all__ = ["ModelStats", "measure_latency", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model, as returned by :func:`model_stats`.

    Attributes:
        params: Number of parameter entries (the sum of ``numel`` over ``model.parameters()``;
            a parameter shared by several modules is counted once).
        nonzero_params: Number of parameter entries that are not exactly zero.
        macs: Multiply-accumulates of one forward pass with the example inputs given to
            :func:`model_stats` (so they grow with the input size and the batch size).
        macs_by_op: ``macs`` split by aten operator name (``"convolution"``, ``"addmm"``, ``"mm"``,
            ``"bmm"``, ``"_scaled_dot_product_flash_attention_for_cpu"``, ...).

    Examples:
        >>> stats = ModelStats(params=10, nonzero_params=4, macs=0)
        >>> round(stats.sparsity, 2)
        0.6
    """

    params: int
    nonzero_params: int
    macs: int
    macs_by_op: dict[str, int] = field(default_factory=dict, hash=False)

    @property
    def sparsity(self) -> float:
        """Fraction of parameter entries that are zero: ``1 - nonzero_params / params``.

        ``0.0`` for a model without parameters.
        """
        if self.params == 0:
            return 0.0
        return 1.0 - self.nonzero_params / self.params


def model_stats(model: nn.Module, example_inputs: ExampleInputs) -> ModelStats:
    """Count the parameters, non-zero parameters and MACs of ``model``.

    MACs (multiply-accumulates) are counted by running one forward pass with ``example_inputs``
    under :class:`torch.utils.flop_counter.FlopCounterMode` and halving its FLOPs. They are the MACs
    of that exact call, so they scale with the input size and with the batch size of
    ``example_inputs``: pass one sample (batch size 1) to get the per-sample figures papers report,
    e.g. about 1.81 G for torchvision's ``resnet18`` on ``1x3x224x224``.

    Counted, at the aten level: convolutions (grouped, depthwise and transposed included), linear
    layers (``addmm``/``mm``), ``matmul``/``bmm``/``baddbmm``, and attention computed by the
    scaled-dot-product kernels (``scaled_dot_product_attention`` and its fused variants).
    Not counted: normalization, activations, pooling, element-wise additions and
    multiplications, softmax and embedding lookups (they are cheap next to the above, and
    FlopCounterMode gives them no formula).

    The forward runs in eval mode with gradients enabled and PyTorch's fused inference path of
    :class:`torch.nn.MultiheadAttention` and :class:`torch.nn.TransformerEncoderLayer` switched
    off, because FlopCounterMode cannot see inside that fused kernel (``vit_b_16`` would read
    11.3 G instead of 17.6 G MACs). The outputs are discarded (:func:`stats_and_outputs` keeps
    them). Afterwards every submodule's train/eval mode and every buffer's values are exactly as
    before, and the fast-path setting is restored.

    Args:
        model: The model. Not modified (lazy modules are materialized by the forward).
        example_inputs: What ``model`` is called with: a tensor (one argument), a tuple/list
            (positional arguments) or a dict (keyword arguments). Tensors are moved to the device
            of the model's first parameter.

    Returns:
        The :class:`ModelStats` of ``model``.

    Raises:
        PruningError: If ``model`` is not an ``nn.Module``, ``example_inputs`` is not a tensor,
            tuple/list or dict, or the model raises when called with ``example_inputs``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(8 * 8 * 8, 10))
        >>> stats = model_stats(net, torch.randn(1, 3, 8, 8))
        >>> stats.params == sum(p.numel() for p in net.parameters())
        True
        >>> stats.macs == 8 * 3 * 9 * 64 + 512 * 10
        True
        >>> sorted(stats.macs_by_op)
        ['addmm', 'convolution']
    """
    return stats_and_outputs(model, example_inputs)[0]


def stats_and_outputs(
    model: nn.Module, example_inputs: ExampleInputs
) -> tuple[ModelStats, list[torch.Tensor]]:
    """:func:`model_stats` and the model's output tensors (eval mode, detached) from the same forward pass."""
    func = "model_stats"
    check_module(model, func)
    check_inputs(example_inputs, func)
    inputs = to_device(example_inputs, _model_device(model))

    counter = FlopCounterMode(display=False)
    with (
        _buffers_restored(model),  # outside: the buffers as before eval(), after the modes come back
        _eval_mode(model),
        _mha_fastpath_disabled(),
        torch.enable_grad(),
        counter,
    ):
        outputs = [t.detach() for t in flatten_outputs(_forward(model, inputs, func))]
    return counted_stats(model, counter), outputs


def counted_stats(model: nn.Module, counter: FlopCounterMode) -> ModelStats:
    """The :class:`ModelStats` of ``model``, with the MACs of the forward pass ``counter`` counted."""
    macs_by_op: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = getattr(op, "__name__", str(op)).removeprefix("aten.")
        macs_by_op[name] = macs_by_op.get(name, 0) + int(flops) // 2

    params = 0
    nonzero = 0
    with torch.no_grad():
        for p in model.parameters():
            if is_lazy(p):
                continue
            params += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return ModelStats(
        params=params,
        nonzero_params=nonzero,
        macs=sum(macs_by_op.values()),
        macs_by_op=macs_by_op,
    )


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Measure the median wall-clock seconds of one forward pass of ``model``.

    The median of :func:`latency_samples` (same arguments): robust to the odd slow call.

    Returns:
        The median latency of one forward pass, in seconds.

    Raises:
        PruningError: As :func:`latency_samples`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> seconds = measure_latency(nn.Linear(10, 5), torch.randn(1, 10), batch_size=4)
        >>> seconds > 0
        True
    """
    times = _latency("measure_latency", model, example_inputs, batch_size, device, warmup, repeats)
    return float(statistics.median(times))


def latency_samples(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> list[float]:
    """Time ``repeats`` forward passes of ``model``: the wall-clock seconds of each, in call order.

    The model runs in eval mode under :func:`torch.no_grad`, as inference does (fused kernels
    included). ``warmup`` untimed calls come first, then ``repeats`` timed ones, each timed with
    :func:`time.perf_counter`; on CUDA the device is synchronized before and after each timed
    call. Every submodule's train/eval mode is restored afterwards. :func:`measure_latency` reports
    their median; their spread says how much a difference between two models can be trusted.

    Args:
        model: The model, already on ``device``. Not moved.
        example_inputs: What ``model`` is called with: a tensor (one argument), a tuple/list
            (positional arguments) or a dict (keyword arguments). Moved to ``device``.
        batch_size: If given, every tensor in ``example_inputs`` (the tensor itself, or the
            tensors directly inside the tuple/list/dict) with at least one dimension is replaced
            by its first sample repeated ``batch_size`` times along dim 0. ``None`` keeps the
            inputs as they are.
        device: Where to run. Defaults to the device of the model's first parameter (CPU for a
            model without parameters).
        warmup: Untimed calls before timing (``>= 0``).
        repeats: Timed calls (``>= 1``).

    Returns:
        The seconds of each timed forward pass.

    Raises:
        PruningError: If an argument is invalid, the model's parameters are not on ``device``,
            or the model raises when called with the inputs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> times = latency_samples(nn.Linear(10, 5), torch.randn(1, 10), repeats=5)
        >>> len(times), min(times) > 0
        (5, True)
    """
    return _latency("latency_samples", model, example_inputs, batch_size, device, warmup, repeats)


LATENCY_MODES = ("eager", "channels_last", "compile")
"""How a model can be run for a latency measurement: see :func:`in_mode`."""


def in_mode(model: nn.Module, example_inputs: ExampleInputs, mode: str) -> tuple[nn.Module, ExampleInputs]:
    """``model`` and ``example_inputs`` prepared to run in ``mode``; ``model`` itself is not changed.

    - ``"eager"``: both as they are.
    - ``"channels_last"``: a copy of the model, and of every 4-D input tensor, in the channels-last
      (NHWC) memory format.
    - ``"compile"``: ``torch.compile`` of a copy (compiled on its first call, so time it after warm-up).

    Raises:
        PruningError: If ``mode`` is not one of :data:`LATENCY_MODES`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net, x = in_mode(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), "channels_last")
        >>> x.is_contiguous(memory_format=torch.channels_last), net.weight.is_contiguous()
        (True, False)
    """
    if mode not in LATENCY_MODES:
        raise PruningError(
            f"`in_mode(mode={mode!r})` is invalid: `mode` must be one of {list(LATENCY_MODES)}."
        )
    if mode == "eager":
        return model, example_inputs
    twin = copy.deepcopy(model)
    if mode == "compile":
        return torch.compile(twin), example_inputs

    def nhwc(value: torch.Tensor) -> torch.Tensor:
        return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value

    inputs = apply_to_collection(example_inputs, torch.Tensor, nhwc)
    return twin.to(memory_format=torch.channels_last), inputs


def _latency(
    func: str,
    model: nn.Module,
    example_inputs: ExampleInputs,
    batch_size: int | None,
    device: torch.device | str | None,
    warmup: int,
    repeats: int,
) -> list[float]:
    check_module(model, func)
    check_inputs(example_inputs, func)
    _check_int(func, "warmup", warmup, 0)
    _check_int(func, "repeats", repeats, 1)
    if batch_size is not None:
        _check_int(func, "batch_size", batch_size, 1)

    model_device = _model_device(model)
    try:
        run_device = model_device if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise PruningError(
            f"`{func}(device={device!r})` is invalid: `device` must be a torch.device or a device "
            f"string such as 'cpu' or 'cuda:0'; got {device!r}."
        ) from err
    if _model_has_params(model) and not _same_device(model_device, run_device):
        raise PruningError(
            f"`{func}(device={str(device)!r})` is invalid: the model's parameters are on "
            f"{model_device}; move the model there first or leave `device` unset."
        )
    inputs = example_inputs if batch_size is None else _expand_batch(example_inputs, batch_size)
    inputs = to_device(inputs, run_device)

    def sync() -> None:
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)

    times: list[float] = []
    with _eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            _forward(model, inputs, func, compiled=True)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            _forward(model, inputs, func, compiled=True)
            sync()
            times.append(time.perf_counter() - start)
    return times


def _forward(model: nn.Module, inputs: ExampleInputs, func: str, *, compiled: bool = False) -> Any:
    """Call ``model`` and return its output; re-raise any failure as a :class:`PruningError`."""
    try:
        return call_model(model, inputs, compiled=compiled)
    except Exception as err:
        raise PruningError(
            f"`{func}(model, example_inputs=...)` failed: the model raised "
            f"{type(err).__name__} when called with {describe(inputs)}: {err}"
        ) from err


def _check_int(func: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PruningError(
            f"`{func}({name}={value!r})` is invalid: `{name}` must be an int >= {minimum}; "
            f"got {type(value).__name__}."
        )
    if value < minimum:
        raise PruningError(
            f"`{func}({name}={value!r})` is invalid: `{name}` must be >= {minimum}; got {value!r}."
        )


def _model_has_params(model: nn.Module) -> bool:
    return next(model.parameters(), None) is not None


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        # "cuda" means the current device.
        index_a = torch.cuda.current_device() if a.index is None else a.index
        index_b = torch.cuda.current_device() if b.index is None else b.index
        return index_a == index_b
    return a.index == b.index or a.index is None or b.index is None


def _expand_batch(example_inputs: ExampleInputs, batch_size: int) -> ExampleInputs:
    """Repeat the first sample of each top-level tensor ``batch_size`` times along dim 0."""

    def expand(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            if value.shape[0] == 0:
                raise PruningError(
                    f"`measure_latency(batch_size={batch_size})` is invalid: it repeats the first "
                    f"sample of each input, but an input has an empty batch: "
                    f"{describe(example_inputs)}."
                )
            return value[:1].expand(batch_size, *value.shape[1:]).contiguous()
        return value

    if isinstance(example_inputs, torch.Tensor):
        return expand(example_inputs)
    if isinstance(example_inputs, Mapping):
        return {k: expand(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return type(example_inputs)(expand(v) for v in example_inputs)
    return example_inputs


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then give each submodule back its own ``training`` flag."""
    modes = [(m, m.training) for m in model.modules()]
    switched = any(training for _, training in modes)
    if switched:
        model.eval()
    try:
        yield
    finally:
        _give_modes_back(modes, switched)


def _give_modes_back(modes: Sequence[tuple[nn.Module, bool]], switched: bool = True) -> None:
    """Give each module its ``training`` flag back (``switched``: ``eval()`` was called on them).

    A class's own ``train`` may do more than set the flag (clear a cache, switch kernels, set an
    attribute): after ``eval()`` it is called again with the module's own mode, parents before children
    (``modules()`` order), and then each flag is set as it was.
    """
    if switched:
        for module, training in modes:
            if type(module).train is not nn.Module.train:
                module.train(training)
    for module, training in modes:
        if module.training is not training:  # Module.__setattr__ is slow: only where it changed
            module.training = training


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Give every buffer of ``model`` back its tensor and its values on exit.

    Also the buffers of norm layers in eval mode: code outside the layer may write them (a hook on
    another module, ``F.batch_norm(..., training=True)`` on the layer's statistics).
    """
    saved = _BufferCopy(model.modules())
    try:
        yield
    finally:
        saved.restore()


class _BufferCopy:
    """The buffers of some modules, their tensors and a copy of their values, to give back.

    Vectors and scalars are copied into one tensor per dtype and device, and given back only where that
    tensor changed: one comparison costs less than a copy per buffer (a model has hundreds of norm
    statistics). Other buffers are copied one by one.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._entries = [
            (m, name, buf, buf.shape)
            for m in modules
            if m._buffers
            for name, buf in m._buffers.items()
            if buf is not None and not is_lazy(buf)
        ]
        self._kinds: dict[tuple, list[int]] = {}
        for i, (_, _, buf, _) in enumerate(self._entries):
            key = (buf.dtype, buf.device, buf.dim()) if buf.dim() < 2 else i
            self._kinds.setdefault(key, []).append(i)
        with torch.no_grad():
            self._saved = {key: self._joined(key, idx) for key, idx in self._kinds.items()}
        self._sizes = {key: [self._entries[i][2].numel() for i in idx] for key, idx in self._kinds.items()}

    def _joined(self, key, idx: list[int]) -> torch.Tensor:
        bufs = [self._entries[i][2] for i in idx]
        if not isinstance(key, tuple):
            return bufs[0].clone()
        return torch.cat(bufs) if key[2] == 1 else torch.stack(bufs)

    def restore(self) -> None:
        """Give every buffer back its tensor and its values."""
        with torch.no_grad():
            for key, idx in self._kinds.items():
                entries = [self._entries[i] for i in idx]
                if all(m._buffers.get(name) is buf and buf.shape == shape for m, name, buf, shape in entries):
                    try:
                        if torch.equal(self._joined(key, idx), self._saved[key]):
                            continue
                    except RuntimeError:  # a buffer was resized in place
                        pass
                saved = self._saved[key]
                parts = [saved] if not isinstance(key, tuple) else saved.split(self._sizes[key])
                for (module, name, buf, shape), values in zip(entries, parts, strict=True):
                    module._buffers[name] = buf
                    if buf.shape == shape:
                        buf.copy_(values.view(shape))


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Switch off the fused attention inference path, whose kernel FlopCounterMode cannot count.

    Grad mode alone is not enough: with frozen weights (``requires_grad=False``) the fast path is
    taken even under :func:`torch.enable_grad`.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
