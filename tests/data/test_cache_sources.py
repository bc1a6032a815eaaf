"""A cache records what made it (the data set's identity, a digest of the encoder's weights): a run with another VAE,
tokenizer or data of the same shapes and count is refused in one line, never trained on the old latents nor mixed into
them; and a resume lists every option that changes what is trained, the task's (--vae, --tokenizer, --data) too."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from scalegen import build_vqvae  # noqa: E402
from scalegen.data import store  # noqa: E402
from scalegen.data.caches import extract_latents, extract_tokens  # noqa: E402
from scalegen.data.fashion_mnist import FashionMNIST  # noqa: E402
from scalegen.data.folder import ImageFolder  # noqa: E402
from scalegen.data.shards import TarShards, pack_folder  # noqa: E402
from scalegen.data.store import MANIFEST_FILE, CachedArrays  # noqa: E402
from scalegen.errors import UserError  # noqa: E402
from scalegen.files import read_json, write_json_atomic  # noqa: E402
from scalegen.models.token_heads import build_token_head  # noqa: E402
from scalegen.models.var import VARConfig  # noqa: E402
from scalegen.tokenizers.sd_vae import load_sd_vae  # noqa: E402
from scalegen.train.dit_task import DiTOptions, train_dit  # noqa: E402
from scalegen.train.guards import changed_options  # noqa: E402
from scalegen.train.trainer import TrainConfig  # noqa: E402
from tests_support import save_tiny_vae, write_image_folder  # noqa: E402

IMAGE_SIZE = 16
SHARD_SIZE = 4  # 15 images: shards of 4, 4, 4 and 3


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two tiny VAEs of the same shapes but other weights, and a class folder of 15 images."""
    root = tmp_path_factory.mktemp("sources")
    first = save_tiny_vae(root / "vae-a")
    autoencoder = AutoencoderKL.from_pretrained(first)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in autoencoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    autoencoder.save_pretrained(root / "vae-b")
    return {"vae-a": first, "vae-b": root / "vae-b", "images": write_image_folder(root / "images")}


def extract(vae: Path, dataset, folder: Path) -> Path:
    return extract_latents(load_sd_vae(vae), dataset, folder, batch_size=2, shard_size=SHARD_SIZE)


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def means(folder: Path) -> torch.Tensor:
    return CachedArrays(folder).column("mean")  # (N, 2, C, h, w)


def test_a_latent_cache_of_another_vae_of_the_same_shapes_is_refused_and_made_anew_once_moved(sources, tmp_path):
    images = ImageFolder(sources["images"], IMAGE_SIZE)
    cache = extract(sources["vae-a"], images, tmp_path / "latents")
    made = files_of(cache)
    with pytest.raises(UserError, match=r"made from another source .* encoder .* \(was .*move .* away") as raised:
        extract(sources["vae-b"], images, cache)
    assert "\n" not in str(raised.value) and files_of(cache) == made  # refused, and nothing on disk touched
    cache.rename(tmp_path / "old-latents")
    extract(sources["vae-b"], images, cache)  # the latents now used are B's, bit for bit
    assert torch.equal(means(cache), means(extract(sources["vae-b"], images, tmp_path / "reference")))
    assert not torch.equal(means(cache), means(tmp_path / "old-latents"))


def test_an_unfinished_cache_is_never_finished_by_another_vae(sources, tmp_path, monkeypatch):
    images = ImageFolder(sources["images"], IMAGE_SIZE)
    real_encode_shard = store.encode_shard
    encoded = []

    def killed_after_one(*args):
        if encoded:
            raise KeyboardInterrupt
        encoded.append(args[3].name)
        real_encode_shard(*args)

    monkeypatch.setattr(store, "encode_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(sources["vae-a"], images, tmp_path / "latents")
    monkeypatch.setattr(store, "encode_shard", real_encode_shard)
    with pytest.raises(UserError, match="encoder"):
        extract(sources["vae-b"], images, tmp_path / "latents")


def test_a_cache_of_other_data_of_the_same_count_is_refused(sources, tmp_path):
    cache = extract(sources["vae-a"], ImageFolder(sources["images"], IMAGE_SIZE), tmp_path / "latents")
    other = shutil.copytree(sources["images"], tmp_path / "other")  # the same names and count, one image redrawn
    Image.fromarray(np.full((20, 23, 3), 7, dtype=np.uint8)).save(other / "class-1" / "3.png")
    with pytest.raises(UserError, match="data.files"):
        extract(sources["vae-a"], ImageFolder(other, IMAGE_SIZE), cache)
    with pytest.raises(UserError, match=r"data.image_size 24 \(was 16\)"):  # the same images at another size
        extract(sources["vae-a"], ImageFolder(sources["images"], 24), cache)
    shards = TarShards(pack_folder(sources["images"], tmp_path / "shards" / "train", SHARD_SIZE), IMAGE_SIZE)
    with pytest.raises(UserError, match=r'data.kind "TarShards" \(was "ImageFolder"\)'):  # the same images, reordered
        extract(sources["vae-a"], shards, cache)


def test_data_identities_follow_files_pixels_and_size(sources, tmp_path):
    folder = ImageFolder(sources["images"], IMAGE_SIZE)
    copy = shutil.copytree(sources["images"], tmp_path / "copy", copy_function=shutil.copy2)
    assert folder.identity() == ImageFolder(copy, IMAGE_SIZE).identity()
    index = pack_folder(sources["images"], tmp_path / "shards" / "train", SHARD_SIZE)
    packed = TarShards(index, IMAGE_SIZE).identity()
    os.utime(index.parent / "train-000002.tar", ns=(1, 1))  # a shard rewritten: its modification time changed
    assert TarShards(index, IMAGE_SIZE).identity() != packed
    fashion, resized = FashionMNIST(), FashionMNIST(image_size=16)
    assert fashion.identity() != resized.identity() and fashion.identity() == FashionMNIST().identity()
    fashion.images[5, 0, 10, 10] += 1  # one pixel
    assert fashion.identity()["pixels"] != FashionMNIST().identity()["pixels"]


def tiny_tokenizer(seed: int):
    torch.manual_seed(seed)
    return build_vqvae(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                       norm_groups=4, use_attention=False, use_mid_attention=False)


def test_a_token_cache_of_another_tokenizer_of_the_same_shapes_is_refused(sources, tmp_path):
    images, head = ImageFolder(sources["images"], 8), build_token_head(VARConfig())  # VAR's head: integer ids
    cache = extract_tokens(tiny_tokenizer(0), images, tmp_path / "tokens", batch_size=4, shard_size=SHARD_SIZE,
                           head=head)
    assert extract_tokens(tiny_tokenizer(0), images, cache, shard_size=SHARD_SIZE, head=head) == cache  # kept
    with pytest.raises(UserError, match="encoder"):
        extract_tokens(tiny_tokenizer(1), images, cache, shard_size=SHARD_SIZE, head=head)


def dit_run(sources, out: Path, vae: str, steps: int, latent_cache: bool) -> None:
    options = DiTOptions(data=str(sources["images"]), image_size=IMAGE_SIZE, vae=vae, latent_cache=latent_cache,
                         depth=1, hidden_size=32, num_heads=2, sample_steps=2)
    train_dit(options, TrainConfig(out=str(out), steps=steps, batch_size=2, log_every=1, device="cpu",
                                   precision="fp32"))


def test_a_resumed_run_with_another_vae_refuses_its_cache_and_names_the_change(sources, tmp_path, capsys):
    first, second = str(sources["vae-a"]), str(sources["vae-b"])
    dit_run(sources, tmp_path / "run", first, 1, latent_cache=True)
    with pytest.raises(UserError, match="latents was made from another source"):
        dit_run(sources, tmp_path / "run", second, 2, latent_cache=True)
    capsys.readouterr()
    dit_run(sources, tmp_path / "run", second, 2, latent_cache=False)
    changed = "options changed since the run was checkpointed (the new values are used): "
    assert f"{changed}--steps 2 (was 1), --vae {second} (was {first})\n" in capsys.readouterr().out


def test_the_changed_options_name_the_task_s_data_latent_space_and_settings():
    tokenizer = {"kind": "vq", "model": {"vocab_size": 16}, "source": "/runs/vq-a", "latent_scale": 1.5}
    stored = {"kind": "dit", "model": {"depth": 1}, "params": 10, "data": "/data/a", "image_size": 16, "classes": ["x"],
              "vae": None, "tokenizer": tokenizer, "objective": {"name": "flow", "repa_weight": 0.5},
              "repa_encoder": "/encoders/a.safetensors", "init_from": {"path": "/official.pt"}}
    current = {**stored, "data": "/data/b", "classes": ["y"], "image_size": 32, "params": 11,
               "tokenizer": {**tokenizer, "source": "/runs/vq-b", "latent_scale": 1.49},
               "objective": {"name": "flow", "repa_weight": 0.25}}
    del current["repa_encoder"], current["init_from"]
    assert changed_options({"lr": 0.1, "steps": 5}, {"lr": 0.2, "steps": 5}, stored, current) == (
        "--lr 0.2 (was 0.1), --data /data/b (was /data/a), --image-size 32 (was 16), --tokenizer /runs/vq-b (was "
        "/runs/vq-a), objective repa_weight 0.25 (was 0.5), --repa-encoder none (was /encoders/a.safetensors)")
    remeasured = {**stored, "tokenizer": {**tokenizer, "latent_scale": 1.49}}  # measured again on another machine
    assert changed_options({}, {}, stored, remeasured) == ""


def test_a_cache_made_before_caches_recorded_their_source_is_used_with_a_warning(sources, tmp_path):
    images = ImageFolder(sources["images"], IMAGE_SIZE)
    cache = extract(sources["vae-a"], images, tmp_path / "latents")
    manifest = read_json(cache / MANIFEST_FILE)
    del manifest["source"]
    write_json_atomic(cache / MANIFEST_FILE, manifest)
    made = files_of(cache)
    with pytest.warns(UserWarning, match="does not say what it was made from"):
        assert extract(sources["vae-b"], images, cache) == cache
    assert files_of(cache) == made
