"""The FID Inception-v3 network: the 2015-12-05 TensorFlow graph the ADM evaluator uses, in PyTorch.

The module and parameter names follow pytorch-fid / torch-fidelity (Conv2d_1a_3x3 … Mixed_7c, `fc` with 1008
classes), so their converted weights file `pt_inception-2015-12-05-6726825d.pth` loads with strict=True.
Differences from torchvision's inception_v3 are the TF graph's: average pools exclude padding, the last block
max-pools, inputs are resized like TF1's ResizeBilinear and scaled by (x - 128) / 128.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.errors import UserError

WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299  # the TF graph resizes every image to 299x299
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)
BATCH_NORM_EPS = 1e-3
PIXEL_CENTER = 128.0  # the graph maps uint8 x to (x - 128) / 128
# sFID: ADM takes `mixed_6/conv:0` (= Mixed_6d.branch1x1 after BN+ReLU, 17x17x192) and keeps its first 7 channels.
SPATIAL_CHANNELS = 7


class InceptionFeatures(NamedTuple):
    """What the evaluator needs from one batch.

    pool: (N, 2048) `pool_3` features for FID and precision/recall.
    spatial: (N, 2023) first 7 channels of `mixed_6/conv`, flattened in TF's (H, W, C) order, for sFID.
    logits: (N, 1008) pool @ fc.weight.T without the bias: ADM's IS takes the softmax of `softmax/logits/MatMul`,
        which is the product before the bias is added (torch-fidelity's `logits_unbiased`).
    """

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


def resize_bilinear_tf1(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize like TensorFlow 1's ResizeBilinear with align_corners=False (no half-pixel offset).

    Source coordinate of output pixel i is i * in/out, truncated for the left neighbour; the right neighbour is
    clamped to the border. The arithmetic follows torch-fidelity's bit-exact CPU version.

    Args:
        images: float tensor (N, C, H, W).
        height: output height.
        width: output width.
    Returns:
        Float tensor (N, C, height, width).
    """

    def sample_grid(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        position = torch.arange(out_size, dtype=images.dtype, device=images.device) * scale  # (out_size,)
        low = position.long()  # (out_size,) floor, positions are >= 0
        high = (low + 1).clamp_max(in_size - 1)  # (out_size,)
        return low, high, position - low.float()

    row_low, row_high, row_weight = sample_grid(images.shape[2], height)
    col_low, col_high, col_weight = sample_grid(images.shape[3], width)
    top = images.index_select(2, row_low)  # (N, C, height, W)
    bottom = images.index_select(2, row_high)  # (N, C, height, W)
    top_left, top_right = top.index_select(3, col_low), top.index_select(3, col_high)  # (N, C, height, width)
    bottom_left, bottom_right = bottom.index_select(3, col_low), bottom.index_select(3, col_high)
    col_weight = col_weight.view(1, 1, 1, width)
    upper = top_left + (top_right - top_left) * col_weight  # (N, C, height, width)
    lower = bottom_left + (bottom_right - bottom_left) * col_weight  # (N, C, height, width)
    return upper + (lower - upper) * row_weight.view(1, 1, height, 1)  # (N, C, height, width)


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm: the weights file has no `num_batches_tracked`, and we never train this net."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, BATCH_NORM_EPS)


class ConvNormRelu(nn.Module):
    """Conv (no bias) + batch norm + ReLU; the unit every tower of the TF graph is built from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def average_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's SAME average pool divides by the number of real (not padded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionBlock(nn.Module):
    """A block whose output is the channel concatenation of its branches."""

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class Mixed35(InceptionBlock):
    """35x35 block (torchvision's InceptionA): 1x1, 5x5, double 3x3 and pooled towers."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvNormRelu(in_channels, 64, 1)
        self.branch5x5_1 = ConvNormRelu(in_channels, 48, 1)
        self.branch5x5_2 = ConvNormRelu(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvNormRelu(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvNormRelu(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvNormRelu(96, 96, 3, padding=1)
        self.branch_pool = ConvNormRelu(in_channels, pool_features, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        five = self.branch5x5_2(self.branch5x5_1(x))
        double_three = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), five, double_three, self.branch_pool(average_pool_3x3(x))]


class Reduce35To17(InceptionBlock):
    """35x35 -> 17x17 reduction (torchvision's InceptionB)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvNormRelu(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvNormRelu(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvNormRelu(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvNormRelu(96, 96, 3, stride=2)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        double_three = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch3x3(x), double_three, F.max_pool2d(x, kernel_size=3, stride=2)]


class Mixed17(InceptionBlock):
    """17x17 block with factorised 7x7 convolutions (torchvision's InceptionC)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        width = channels_7x7
        self.branch1x1 = ConvNormRelu(in_channels, 192, 1)
        self.branch7x7_1 = ConvNormRelu(in_channels, width, 1)
        self.branch7x7_2 = ConvNormRelu(width, width, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvNormRelu(width, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvNormRelu(in_channels, width, 1)
        self.branch7x7dbl_2 = ConvNormRelu(width, width, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvNormRelu(width, width, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvNormRelu(width, width, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvNormRelu(width, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvNormRelu(in_channels, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double_seven = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double_seven = layer(double_seven)
        return [self.branch1x1(x), seven, double_seven, self.branch_pool(average_pool_3x3(x))]


class Reduce17To8(InceptionBlock):
    """17x17 -> 8x8 reduction (torchvision's InceptionD)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvNormRelu(in_channels, 192, 1)
        self.branch3x3_2 = ConvNormRelu(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvNormRelu(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvNormRelu(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvNormRelu(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvNormRelu(192, 192, 3, stride=2)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven_three = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven_three = layer(seven_three)
        return [three, seven_three, F.max_pool2d(x, kernel_size=3, stride=2)]


class Mixed8(InceptionBlock):
    """8x8 block with split 1x3 / 3x1 convolutions (torchvision's InceptionE).

    The TF graph's last block (Mixed_7c) max-pools its pool tower where the paper and torchvision average.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvNormRelu(in_channels, 320, 1)
        self.branch3x3_1 = ConvNormRelu(in_channels, 384, 1)
        self.branch3x3_2a = ConvNormRelu(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvNormRelu(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvNormRelu(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvNormRelu(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvNormRelu(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvNormRelu(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvNormRelu(in_channels, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], dim=1)
        double_three = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double_three = torch.cat([self.branch3x3dbl_3a(double_three), self.branch3x3dbl_3b(double_three)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else average_pool_3x3(x)
        return [self.branch1x1(x), three, double_three, self.branch_pool(pooled)]


class FIDInception(nn.Module):
    """Inception-v3 as in the 2015-12-05 TF graph; returns pool, spatial and logit features of uint8 images."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvNormRelu(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvNormRelu(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvNormRelu(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvNormRelu(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvNormRelu(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_features=32)
        self.Mixed_5c = Mixed35(256, pool_features=64)
        self.Mixed_5d = Mixed35(288, pool_features=64)
        self.Mixed_6a = Reduce35To17(288)
        self.Mixed_6b = Mixed17(768, channels_7x7=128)
        self.Mixed_6c = Mixed17(768, channels_7x7=160)
        self.Mixed_6d = Mixed17(768, channels_7x7=160)
        self.Mixed_6e = Mixed17(768, channels_7x7=192)
        self.Mixed_7a = Reduce17To8(768)
        self.Mixed_7b = Mixed8(1280, max_pool=False)
        self.Mixed_7c = Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """Features of a batch of uint8 RGB images.

        Args:
            images: uint8 tensor (N, H, W, 3) or (N, 3, H, W), any H, W.
        Returns:
            InceptionFeatures with pool (N, 2048), spatial (N, 2023) and logits (N, 1008), float32.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise UserError(f"expected uint8 images (N,H,W,3) or (N,3,H,W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # (N, 3, H, W)
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE, INPUT_SIZE)  # (N, 3, 299, 299)
        x = (x - PIXEL_CENTER) / PIXEL_CENTER  # (N, 3, 299, 299) in [-1, 1)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 2023) in TF's NHWC order
        x = self.Mixed_6e(torch.cat(branches, dim=1))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        logits = pool @ self.fc.weight.T  # (N, 1008)
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def load_inception(weights_path: str | Path | None) -> FIDInception:
    """Build the FID Inception and load the converted TF weights, on the CPU.

    Args:
        weights_path: local path of `pt_inception-2015-12-05-6726825d.pth`.
    Returns:
        The network in eval mode, without gradients.
    """
    how_to_get = (
        f"download {WEIGHTS_FILE_NAME} (pytorch-fid's GitHub release: {WEIGHTS_URL}) "
        "and pass it with --inception-weights FILE"
    )
    if weights_path is None:
        raise UserError(f"no Inception weights given: {how_to_get}")
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights {path} not found: {how_to_get}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read {path} as a PyTorch weights file ({error}): {how_to_get}") from error
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds no state dict: {how_to_get}")
    # BatchNorm counters carry no information at inference; some copies of the file have them, the original not.
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    model = FIDInception()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} is not the FID Inception weights file: {how_to_get}") from error
    return model
