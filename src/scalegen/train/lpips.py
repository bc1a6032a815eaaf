"""LPIPS perceptual distance (Zhang et al., 2018) with the VGG16 backbone, for tokenizer training.

The module's state dict has the key layout of the official `lpips.LPIPS(net="vgg")` (and taming-transformers'
copy): `scaling_layer.{shift,scale}`, `net.slice{1..5}.{i}.{weight,bias}` with torchvision's VGG16 `features`
indices, and `lin{0..4}.model.1.weight`. Weights come only from a local file the user gives (`--lpips-weights`):
a full LPIPS state dict saved with `torch.save(lpips.LPIPS(net="vgg").state_dict(), FILE)` or as .safetensors.
No torchvision needed, nothing downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from scalegen.files import safe_torch_load
from scalegen.errors import UserError

# VGG16 `features` layout: conv widths per stage; each stage ends at the ReLU LPIPS taps (relu1_2 … relu5_3).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# ImageNet statistics of inputs in [-1, 1], as the official ScalingLayer.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
FEATURE_NORM_EPS = 1e-10
RGB_CHANNELS = 3


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the VGG input statistics."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, RGB_CHANNELS, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, RGB_CHANNELS, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.shift) / self.scale  # (B, 3, H, W)


class VGG16Slices(nn.Module):
    """torchvision's VGG16 `features` cut into five slices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    Layers keep their index in `features` as their name, so keys read `slice2.5.weight` as officially.
    """

    def __init__(self):
        super().__init__()
        index, in_channels = 0, RGB_CHANNELS
        for stage_number, widths in enumerate(VGG16_STAGES, start=1):
            stage = nn.Sequential()
            if stage_number > 1:
                stage.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                index += 1
            for width in widths:
                stage.add_module(str(index), nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
                stage.add_module(str(index + 1), nn.ReLU(inplace=False))
                index, in_channels = index + 2, width
            setattr(self, f"slice{stage_number}", stage)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], images
        for stage_number in range(1, len(VGG16_STAGES) + 1):
            x = getattr(self, f"slice{stage_number}")(x)  # (B, C_k, H_k, W_k)
            features.append(x)
        return features


class LinearHead(nn.Module):
    """1×1 conv without bias weighting the channels of one feature difference (key `model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 1, H, W)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two image batches in [-1, 1]; frozen (a loss, never trained)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for number, widths in enumerate(VGG16_STAGES):
            setattr(self, f"lin{number}", LinearHead(widths[-1]))
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image distance.

        Args:
            images, targets: (B, C, H, W) in [-1, 1]; one-channel images are repeated to RGB.

        Returns:
            (B,) LPIPS distances (differentiable with respect to both inputs).
        """
        if images.shape[1] == 1:
            images, targets = images.expand(-1, RGB_CHANNELS, -1, -1), targets.expand(-1, RGB_CHANNELS, -1, -1)
        both = self.net(self.scaling_layer(torch.cat([images, targets])))  # 5 × (2B, C_k, H_k, W_k)
        distance = images.new_zeros(images.shape[0])  # (B,)
        for number, features in enumerate(both):
            first, second = (normalize_channels(half) for half in features.chunk(2))  # (B, C_k, H_k, W_k) ×2
            weighted = getattr(self, f"lin{number}")((first - second).square())  # (B, 1, H_k, W_k)
            distance = distance + weighted.mean(dim=(1, 2, 3))  # (B,)
        return distance


def normalize_channels(features: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm over channels at every position, as the official `normalize_tensor`."""
    norm = features.square().sum(dim=1, keepdim=True).sqrt()  # (B, 1, H, W)
    return features / (norm + FEATURE_NORM_EPS)  # (B, C, H, W)


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS-VGG with weights from a local file (.pth/.pt via weights-only loading, or .safetensors).

    Args:
        path: a full LPIPS state dict (VGG16 slices and linear heads, official key names).

    Returns:
        The frozen `LPIPS` module in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--lpips-weights {path} not found; pass a local LPIPS-VGG state dict (.pth or .safetensors)")
    weights = load_file(path) if path.suffix == ".safetensors" else safe_torch_load(path)
    module = LPIPS()
    # The official vgg.pth holds only the linear heads; the scaling constants are fixed, so they may be absent.
    expected = set(module.state_dict()) - {"scaling_layer.shift", "scaling_layer.scale"}
    missing = sorted(expected - set(weights))
    if missing:
        raise UserError(
            f"{path} lacks {len(missing)} LPIPS weights (e.g. {missing[0]}); save the full module with "
            "torch.save(lpips.LPIPS(net='vgg').state_dict(), FILE), which includes the VGG16 backbone"
        )
    try:
        module.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise UserError(f"{path} does not match LPIPS-VGG: {str(error).splitlines()[0]}") from None
    unexpected = sorted(set(weights) - set(module.state_dict()))
    if unexpected:
        raise UserError(f"{path} has keys LPIPS-VGG does not know (e.g. {unexpected[0]}); is it an LPIPS-VGG file?")
    return module
