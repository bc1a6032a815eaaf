"""Makes tests/golden/inception_golden.npz with torch-fidelity's own code (not a dependency of scalegen).

Run in a scratch venv, never the project's:
    python3 -m venv /tmp/fidvenv && /tmp/fidvenv/bin/pip install torch==2.13.0 torch-fidelity
    PYTHONPATH=src:tests:tests/eval /tmp/fidvenv/bin/python tests/golden/make_inception_golden.py
(pip resolved torch-fidelity 0.4.0 with torch 2.14.1 for the stored file.) It loads our seeded random Inception weights into torch-fidelity's FeatureExtractorInceptionV3 and records its
TF1 resize and its features (pool 2048, logits_unbiased 1008, Mixed_6d.branch1x1 via a hook for sFID).
"""
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from inception_testing import seeded_inception, weight_checksum

OUT = Path(__file__).with_name("inception_golden.npz")
RESIZE_STRIDE = 10  # keep every 10th row and column of the 299x299 resize: small file, still covers the grid


def main() -> None:
    random = np.random.RandomState(0)
    images = random.randint(0, 256, size=(4, 24, 40, 3), dtype=np.uint8)  # non-square: both axes differ
    small = random.randint(0, 256, size=(2, 3, 5, 7)).astype(np.float32)
    tf1 = lambda x, size: interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False)
    resize_small_up = tf1(torch.from_numpy(small), (11, 13)).numpy()
    resize_small_down = tf1(torch.from_numpy(small), (3, 4)).numpy()
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    resize_299 = tf1(chw.float(), (299, 299))[:, :, ::RESIZE_STRIDE, ::RESIZE_STRIDE].numpy()

    ours = seeded_inception(seed=0)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "random_inception.pth"
        torch.save(ours.state_dict(), weights)
        reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(weights))
    captured = {}
    reference.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: captured.update(x=output))
    with torch.no_grad():
        pool, logits = reference(chw)
    spatial = captured["x"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # TF (H, W, C) order
    np.savez(OUT, images=images, small=small, resize_small_up=resize_small_up,
             resize_small_down=resize_small_down, resize_299=resize_299, resize_stride=RESIZE_STRIDE,
             pool=pool.numpy(), logits=logits.numpy(), spatial=spatial.numpy(),
             weight_checksum=weight_checksum(ours), torch_version=torch.__version__)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); pool mean {pool.mean():.4f} std {pool.std():.4f}, "
          f"logits std {logits.std():.4f}, spatial mean {spatial.mean():.4f}")


if __name__ == "__main__":
    main()
