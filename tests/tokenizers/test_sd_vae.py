"""SD-VAE latent space through diffusers' AutoencoderKL (a tiny random one saved locally) and the latent cache."""
import pytest
import torch

pytest.importorskip("diffusers")

from scalegen.cli.main import main  # noqa: E402
from scalegen.data.caches import LatentCache, extract_latents  # noqa: E402
from scalegen.data.source import DataSource  # noqa: E402
from scalegen.errors import UserError  # noqa: E402
from scalegen.train.run_log import read_log  # noqa: E402
from scalegen.tokenizers.sd_vae import LATENT_SCALE, load_sd_vae  # noqa: E402
from tests_support import save_tiny_vae  # noqa: E402


class RandomImages(DataSource):
    channels, num_classes = 3, 4

    def __len__(self):
        return 6

    def __getitem__(self, item):
        index, flip = item
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, 16, 16, generator=generator) * 2 - 1  # (3, 16, 16)
        return {"image": image.flip(-1) if flip else image, "label": torch.tensor(index % 4)}


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def test_encode_decode_shapes_and_scale(tiny_vae_folder):
    codec = load_sd_vae(tiny_vae_folder)
    images = RandomImages()[(0, False)]["image"].unsqueeze(0)  # (1, 3, 16, 16)
    mean, std = codec.encode_distribution(images)
    raw = codec.autoencoder.encode(images).latent_dist.mean
    assert mean.shape == (1, 4, 2, 2)
    torch.testing.assert_close(mean, raw * LATENT_SCALE)
    assert codec.decode(mean).shape == (1, 3, 16, 16)


def test_latent_cache_keeps_the_flip(tiny_vae_folder, tmp_path):
    codec = load_sd_vae(tiny_vae_folder)
    dataset = RandomImages()
    cache = LatentCache(extract_latents(codec, dataset, tmp_path / "latents", batch_size=4, shard_size=4))
    assert len(cache) == 6 and cache.arrays.row("mean", 2).shape == (2, 4, 2, 2)
    flipped = dataset[(2, True)]["image"].unsqueeze(0)
    expected_mean, _ = codec.encode_distribution(flipped)
    torch.testing.assert_close(cache.arrays.row("mean", 2, True).float(), expected_mean[0], atol=2e-3, rtol=2e-3)


def test_train_dit_in_latent_space_with_a_cache(tiny_vae_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("scalegen.train.dit_task.open_source", lambda data, size: RandomImages())
    main(["train", "dit", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
          "--image-size", "16", "--vae", str(tiny_vae_folder), "--latent-cache", "--steps", "2", "--batch-size", "2",
          "--sample-steps", "2", "--log-every", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "latents" / "manifest.json").exists()
    assert len(read_log(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "samples" / "step-0000002.png").exists()


def test_a_folder_without_an_autoencoder_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a VAE")
    with pytest.raises(UserError, match="holds no diffusers AutoencoderKL"):
        load_sd_vae(tmp_path)
