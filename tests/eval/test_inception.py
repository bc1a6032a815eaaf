"""The FID Inception: official key layout, output shapes, TF1 resize and features equal to torch-fidelity's.

Golden data: tests/golden/inception_golden.npz, made by tests/golden/make_inception_golden.py with torch-fidelity 0.4.0
in a scratch venv (command in that file), from the seeded random weights of tests/eval/inception_testing.py.
"""

import numpy as np
import pytest
import torch

from inception_testing import seeded_inception, weight_checksum
from scalegen.errors import UserError
from scalegen.eval.inception import WEIGHTS_FILE_NAME, FIDInception, load_inception, resize_bilinear_tf1
from tests_support import GOLDEN

FEATURE_TOLERANCE = 1e-4  # absolute, on features of order one; measured difference is 0 on CPU


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "inception_golden.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def network():
    return seeded_inception(seed=0)


def test_state_dict_matches_official_layout():
    rows = [line.rstrip("\n").split("\t") for line in open(GOLDEN / "inception_keys.tsv") if not line.startswith("#")]
    expected = {key: tuple(int(n) for n in shape.split(",")) for key, shape in rows}
    ours = {key: tuple(value.shape) for key, value in FIDInception().state_dict().items()}
    assert ours == expected
    assert len(ours) == 472 and ours["fc.weight"] == (1008, 2048)


def test_resize_matches_torch_fidelity(golden):
    small = torch.from_numpy(golden["small"])
    assert torch.equal(resize_bilinear_tf1(small, 11, 13), torch.from_numpy(golden["resize_small_up"]))
    assert torch.equal(resize_bilinear_tf1(small, 3, 4), torch.from_numpy(golden["resize_small_down"]))
    images = torch.from_numpy(golden["images"]).permute(0, 3, 1, 2).float()
    stride = int(golden["resize_stride"])
    resized = resize_bilinear_tf1(images, 299, 299)[:, :, ::stride, ::stride]
    assert (resized - torch.from_numpy(golden["resize_299"])).abs().max() <= 1e-4


def test_features_match_torch_fidelity(golden, network):
    assert weight_checksum(network) == pytest.approx(float(golden["weight_checksum"]), rel=1e-12)
    count = 2  # of the 4 golden images: the 299x299 network is slow on a CPU
    features = network(torch.from_numpy(golden["images"][:count]))  # NHWC uint8 input
    assert features.pool.shape == (count, 2048)
    assert features.spatial.shape == (count, 17 * 17 * 7)
    assert features.logits.shape == (count, 1008)
    for name in ("pool", "spatial", "logits"):
        difference = np.abs(getattr(features, name).numpy() - golden[name][:count]).max()
        assert difference <= FEATURE_TOLERANCE, name


def test_channel_first_input_and_small_images(network):
    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    channels_last = network(images)
    channels_first = network(images.permute(0, 3, 1, 2).contiguous())
    assert torch.equal(channels_last.pool, channels_first.pool)
    assert torch.isfinite(channels_last.pool).all() and channels_last.pool.std() > 0


def test_rejects_float_images(network):
    with pytest.raises(UserError, match="uint8"):
        network(torch.zeros(1, 3, 8, 8))


def test_missing_weights_name_the_file(tmp_path):
    for path in (None, tmp_path / "absent.pth"):
        with pytest.raises(UserError, match=WEIGHTS_FILE_NAME) as error:
            load_inception(path)
        assert "--inception-weights" in str(error.value) and "pytorch-fid" in str(error.value)


def test_loads_weights_file_strictly(tmp_path, network):
    path = tmp_path / WEIGHTS_FILE_NAME
    torch.save(network.state_dict(), path)
    loaded = load_inception(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), network.state_dict().values()))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not the FID Inception"):
        load_inception(tmp_path / "wrong.pth")
