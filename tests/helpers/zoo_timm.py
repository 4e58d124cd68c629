"""timm models for the coverage survey: one small variant per family, randomly initialized, small inputs."""

from __future__ import annotations

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from tests.helpers.zoo import calibrate_norms

# A family is the timm module that registers a model; these modules also hold clearly different
# architectures, which get a family each (name prefix, ``tf_`` ports included).
SPLIT = {
    "efficientnet": ("mixnet", "mnasnet", "mobilenetv2", "tinynet", "efficientnetv2"),
    "byobnet": ("gernet", "repvgg", "mobileone", "regnetz"),
    "resnet": ("resnext", "seresnext", "ecaresnet"),
    "metaformer": ("poolformer", "convformer", "caformer"),
    "mlp_mixer": ("gmlp", "resmlp"),
    "maxxvit": ("coatnet", "maxvit"),
    "cspnet": ("darknet", "cspdarknet"),
    "mobilenetv3": ("lcnet",),
    "nfnet": ("nf_",),
    "regnet": ("regnetx", "regnety"),
}
# Input sides tried in turn: 96 suits patch×pooling grids of 48 (Gemma 4), 112 patches of 14 (DeepSeek).
SIZES = (64, 96, 112)


def timm_family(module: str, name: str) -> str:
    """``module`` or ``module:prefix`` (see :data:`SPLIT`)."""
    for prefix in SPLIT.get(module, ()):
        if name.startswith((prefix, f"tf_{prefix}")):
            return f"{module}:{prefix.rstrip('_')}"
    return module


def timm_families() -> dict[str, str]:
    """Family → its variant with the fewest parameters (``test_*`` models left out).

    Parameters are counted on the meta device (nothing allocated); a few minutes for all of timm.
    """
    members: dict[str, list[str]] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            if not name.startswith("test_"):
                members.setdefault(timm_family(module, name), []).append(name)
    chosen = {}
    for family, names in sorted(members.items()):
        counts = {n: _meta_params(n) for n in names}
        chosen[family] = min(names, key=lambda n: (counts[n], n))
    return chosen


def _meta_params(name: str) -> float:
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=10)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return float("inf")


def timm_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """``timm.create_model(name)`` (random init, 10 classes) in eval mode, and a batch of 2 inputs.

    Tries small square inputs first (:data:`SIZES`, with ``img_size=`` where the model takes it, which
    shrinks ViT position embeddings), then the pretrained config's input size. Layers initialized to
    zero (heads, zero-init residual norms) get random weights so no branch is trivially dead, and the
    BatchNorm statistics are calibrated on a separate batch of 8 (see :func:`calibrate_norms`).

    Raises:
        RuntimeError: If no input size works (the last error chained).
    """
    sizes = list(dict.fromkeys([(s, s) for s in SIZES] + [tuple(get_pretrained_cfg(name).input_size[1:])]))
    errors: list[Exception] = []
    attempts = [(size, {"img_size": size}) for size in sizes] + [(size, None) for size in sizes]
    plain, takes_img_size = None, True  # one model without img_size serves every size
    for size, kwargs in attempts:
        if kwargs and not takes_img_size:
            continue
        try:
            if kwargs is None:
                plain = plain or _create(name)
            model = _create(name, **kwargs) if kwargs else plain
            x = _images(2, size, seed=0)
            with torch.no_grad():
                model(x)
        except Exception as err:
            errors.append(err)
            takes_img_size = takes_img_size and not (kwargs and isinstance(err, TypeError))
            continue
        randomize_zeros(model)
        calibrate_norms(model, _images(8, size, seed=1))
        return model, x
    raise RuntimeError(f"{name} runs at no input size tried") from errors[-1]


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def _images(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def randomize_zeros(model: nn.Module) -> None:
    """Give all-zero conv/linear weights small random values and all-zero norm scales ones."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.any():
                continue
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                nn.init.normal_(weight, std=0.02)
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
                weight.fill_(1.0)
