"""The tokenizer seam: a tokenizer kind registered once, from this file alone (a toy average-pooling "tokenizer"), is
saved as a run, loaded back by the public loader, gives a DiT its latent space (training, latent cache, sampling
through the public API) and `scalegen reconstruct` its round trip; without tokens, a VAR refuses it in one line."""
import importlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import scalegen
from scalegen.cli.main import main
from scalegen.data.store import MANIFEST_FILE, weights_digest
from scalegen.errors import UserError
from scalegen.eval.reconstruction import data_image_size, reconstruct
from scalegen.runs.folder import CONFIG_FILE, TOKENIZER_FILE, RunFolder, last_checkpoint, save_checkpoint
from scalegen.runs.loading import check_kind, load_dit, token_tokenizer
from scalegen.tokenizers.codec import (
    TOKENIZER_KINDS, TokenizerKind, TokenizerLatents, encoded, kind_of, register_tokenizer, tokenizer_codec,
)
from scalegen.train.dit_task import train_dit
from scalegen.train.task_options import DiTOptions
from scalegen.train.trainer import TrainConfig
from tests_support import tiny_fashion, write_fashion_subset

TOY_KIND = "toy_pool"


@dataclass
class PoolConfig:
    in_channels: int = 1
    image_size: int = 8
    factor: int = 2


class PoolTokenizer(nn.Module):
    """Latents: the images average-pooled by `factor`, times a learnt gain; decoding repeats each latent pixel."""

    def __init__(self, config: PoolConfig):
        super().__init__()
        self.config = config
        self.gain = nn.Parameter(torch.ones(config.in_channels))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.config.factor) * self.gain.view(1, -1, 1, 1)  # (B, C, H/f, W/f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents / self.gain.view(1, -1, 1, 1), scale_factor=self.config.factor)  # (B, C, H, W)


class PoolCodec(TokenizerLatents):
    """The toy's latents divided by their spread over the data, deterministic (a zero std)."""

    def __init__(self, tokenizer: PoolTokenizer, latent_scale: float):
        super().__init__(tokenizer)
        self.latent_scale = latent_scale

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.tokenizer.image_size // self.tokenizer.config.factor

    @classmethod
    def from_description(cls, tokenizer: PoolTokenizer, description: dict) -> "PoolCodec":
        return cls(tokenizer, description["latent_scale"])

    @classmethod
    def measure(cls, tokenizer: PoolTokenizer, dataset: Dataset, device, count: int) -> dict:
        return {"latent_scale": 1.0 / encoded(cls(tokenizer, 1.0), dataset, device, count).std().item()}

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.tokenizer.encode(images) * self.latent_scale  # (B, C, h, w)
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(latents / self.latent_scale)


TOY = register_tokenizer(TokenizerKind(
    name=TOY_KIND, title="pooling tokenizer", config_class=PoolConfig, model_class=PoolTokenizer,
    round_trip=lambda tokenizer, images: tokenizer.decode(tokenizer.encode(images)),
    advice="train a DiT in its latent space with `scalegen train dit --tokenizer {path}`", codec_class=PoolCodec))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """The toy tokenizer saved as a run (gain 2), and the IDX data folder."""
    root = tmp_path_factory.mktemp("toy")
    write_fashion_subset(root / "data")
    tokenizer = PoolTokenizer(PoolConfig())
    with torch.no_grad():
        tokenizer.gain.fill_(2.0)
    save_checkpoint(root / "pool", 1, {"kind": TOY_KIND, "model": asdict(tokenizer.config)}, tokenizer.state_dict(),
                    None, {"step": 1})
    return root


def test_a_toy_kind_registered_here_loads_through_the_public_loader(toy_run):
    tokenizer = scalegen.load_tokenizer(toy_run / "pool")
    assert type(tokenizer) is PoolTokenizer and kind_of(tokenizer) is TOY and not tokenizer.training
    assert tokenizer.config == PoolConfig() and tokenizer.gain.tolist() == [2.0]
    assert register_tokenizer(TOY) is TOY  # registering the same kind again changes nothing
    with pytest.raises(ValueError, match=TOY_KIND):  # another kind under a taken name is refused
        register_tokenizer(TokenizerKind(TOY_KIND, "other", PoolConfig, nn.Identity, TOY.round_trip, ""))


@pytest.mark.end_to_end
def test_a_dit_trains_on_the_toy_kinds_cached_latents_and_samples_through_it(toy_run, tmp_path):
    run = tmp_path / "dit"
    options = DiTOptions(data=str(toy_run / "data"), image_size=8, tokenizer=str(toy_run / "pool"), latent_cache=True,
                         depth=1, hidden_size=32, num_heads=2, patch_size=1, sample_steps=2)
    train_dit(options, TrainConfig(out=str(run), steps=2, batch_size=16, log_every=1, checkpoint_every=1000,
                                   device="cpu"))
    config = json.loads((last_checkpoint(run) / CONFIG_FILE).read_text())
    assert config["tokenizer"]["kind"] == TOY_KIND and config["tokenizer"]["model"] == asdict(PoolConfig())
    assert (config["model"]["in_channels"], config["model"]["input_size"]) == (1, 4)
    copied = scalegen.load_tokenizer(run)  # the run's copy of the toy, rebuilt by its registered kind
    assert type(copied) is PoolTokenizer and copied.gain.tolist() == [2.0] and (run / TOKENIZER_FILE).exists()
    manifest = json.loads((RunFolder(run).latent_cache / MANIFEST_FILE).read_text())
    assert manifest["source"]["encoder"] == weights_digest(copied)  # the cache records the tokenizer's weights

    model = load_dit(run)
    assert isinstance(model.decoder, PoolCodec) and model.decoder.latent_scale == config["tokenizer"]["latent_scale"]
    images = torch.stack([tiny_fashion(8)[(index, False)]["image"] for index in range(4)])  # (4, 1, 8, 8)
    latents = model.decoder.encode(images)  # (4, 1, 4, 4)
    torch.testing.assert_close(latents, F.avg_pool2d(images, 2) * 2.0 * model.decoder.latent_scale)
    samples = model.generate(torch.arange(3), cfg=2.0, steps=2, seed=0)  # (3, 1, 8, 8) in [0, 1]
    assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    pooled = samples.unfold(2, 2, 2).unfold(3, 2, 2)  # (3, 1, 4, 4, 2, 2): decoded through the toy, blocks repeat
    assert torch.equal(pooled, pooled[..., :1, :1].expand_as(pooled))


def test_reconstruct_takes_the_toy_kind(toy_run, tmp_path, capsys):
    tokenizer = scalegen.load_tokenizer(toy_run / "pool")
    assert data_image_size(tokenizer) == 8
    originals, reconstructions = reconstruct(tokenizer, tiny_fashion(8), 4)  # (4, 1, 8, 8) each in [0, 1]
    expected = F.interpolate(F.avg_pool2d(originals * 2 - 1, 2), scale_factor=2)  # the toy's round trip, in [-1, 1]
    torch.testing.assert_close(reconstructions * 2 - 1, expected, atol=1e-6, rtol=0)
    main(["reconstruct", "--tokenizer", str(toy_run / "pool"), "--data", str(toy_run / "data"), "--count", "4",
          "--out", str(tmp_path / "pairs.png"), "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["num_images"] == 4


def test_a_kind_without_tokens_is_refused_by_a_var_in_one_line(toy_run):
    tokenizer = scalegen.load_tokenizer(toy_run / "pool")
    with pytest.raises(UserError, match="pooling tokenizer, which has no tokens for a VAR") as refused:
        token_tokenizer(tokenizer, toy_run / "pool")
    assert "\n" not in str(refused.value) and "vqvae" in str(refused.value)
    with pytest.raises(UserError, match=f"holds a pooling tokenizer model, not a DiT.*--tokenizer {toy_run}"):
        check_kind({"kind": TOY_KIND}, "dit", toy_run)  # its registered title and advice


def test_every_registered_kinds_advice_names_real_commands_and_functions(capsys):
    for kind in TOKENIZER_KINDS.values():
        for command in re.findall(r"`scalegen ([a-z ]+?) --", kind.advice):
            with pytest.raises(SystemExit) as stopped:
                main([*command.split(), "--help"])
            assert stopped.value.code == 0, command
        capsys.readouterr()
        for function in re.findall(r"(scalegen(?:\.\w+)+)", kind.advice):
            module, name = function.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), name), function


class PlainTokenizer(PoolTokenizer):
    """The toy under another kind that offers a DiT no latent space."""


PLAIN = register_tokenizer(TokenizerKind(
    name="toy_plain", title="plain tokenizer", config_class=PoolConfig, model_class=PlainTokenizer,
    round_trip=TOY.round_trip, advice=""))


def test_a_dit_refuses_a_kind_without_a_latent_space_in_one_line(toy_run, tmp_path):
    save_checkpoint(tmp_path / "plain", 1, {"kind": "toy_plain", "model": asdict(PoolConfig())},
                    PlainTokenizer(PoolConfig()).state_dict(), None, {"step": 1})
    assert kind_of(scalegen.load_tokenizer(tmp_path / "plain")) is PLAIN  # the nearest registered class decides
    options = DiTOptions(data=str(toy_run / "data"), image_size=8, tokenizer=str(tmp_path / "plain"), depth=1,
                         hidden_size=32, num_heads=2, patch_size=1)
    with pytest.raises(UserError, match="plain tokenizer, which has no latent space for a DiT") as refused:
        train_dit(options, TrainConfig(out=str(tmp_path / "dit"), steps=1, batch_size=16, device="cpu"))
    assert "\n" not in str(refused.value) and f"the tokenizer {tmp_path / 'plain'} is" in str(refused.value)
    with pytest.raises(UserError, match="Identity, of no registered tokenizer kind; register its kind"):
        tokenizer_codec(nn.Identity(), {"latent_scale": 1.0})


@pytest.mark.end_to_end
def test_the_command_line_trains_exports_and_samples_a_dit_on_the_toy_kind(toy_run, tmp_path):
    """No command names the kinds: `train dit --tokenizer` encodes through the toy on the fly, `export` copies it
    with the DiT into a self-contained folder (the run and the tokenizer's own run gone), which samples as the run
    did, also from `sample dit`."""
    tokenizer, run, exported = tmp_path / "pool", tmp_path / "dit", tmp_path / "export"
    shutil.copytree(toy_run / "pool", tokenizer)
    main(["train", "dit", "--tokenizer", str(tokenizer), "--data", str(toy_run / "data"), "--image-size", "8",
          "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "1", "--batch-size", "16",
          "--steps", "2", "--sample-steps", "2", "--device", "cpu", "--out", str(run)])
    labels = torch.arange(2)
    sampled = scalegen.load_dit(run).generate(labels, cfg=2.0, steps=2, seed=0)  # (2, 1, 8, 8)
    main(["export", "--run", str(run), "--out", str(exported), "--fp32"])
    shutil.rmtree(run), shutil.rmtree(tokenizer)
    model = scalegen.load_dit(exported)
    assert isinstance(model.decoder, PoolCodec) and type(model.decoder.tokenizer) is PoolTokenizer
    assert model.decoder.tokenizer.gain.tolist() == [2.0]
    torch.testing.assert_close(model.generate(labels, cfg=2.0, steps=2, seed=0), sampled, atol=0, rtol=0)
    main(["sample", "dit", "--ckpt", str(exported), "--classes", "0,1", "--per-class", "2", "--steps", "2",
          "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 0
