"""Tokenizer training: reconstruction improves on real data, usage is logged, dead codes are re-initialised,
the GAN path runs and resumes exactly, LPIPS has the official layout."""
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scalegen.cli.main import main
from scalegen.errors import UserError
from scalegen.runs.folder import last_checkpoint, load_training_state
from scalegen.train.gan_losses import PatchDiscriminator, adaptive_weight
from scalegen.train.lpips import LPIPS, load_lpips
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from scalegen.train.tokenizer_task import TokenizerLosses, VQVAETask, reinitialize_dead_codes
from scalegen.tokenizers.vqvae import VQVAEConfig
from tests_support import tiny_fashion

TINY_TOKENIZER = VQVAEConfig(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                             share_quant_resi=3, in_channels=1, norm_groups=4, use_attention=False, use_mid_attention=False)


def tokenizer_run(out: Path, steps: int, losses: TokenizerLosses | None = None, **options) -> dict:
    torch.manual_seed(0)
    data = tiny_fashion(8)
    grid = torch.stack([data[(index, False)]["image"] for index in range(4)])  # (4, 1, 8, 8)
    task = VQVAETask(TINY_TOKENIZER, losses or TokenizerLosses(), grid)
    settings = dict(out=str(out), steps=steps, batch_size=16, lr=3e-3, ema_decay=0.0, log_every=1,
                    checkpoint_every=1000, device="cpu")
    settings.update(options)
    return train(task, data, TrainConfig(**settings))


def test_a_short_run_lowers_the_reconstruction_loss_and_logs_usage_per_scale(tmp_path):
    tokenizer_run(tmp_path, 30, TokenizerLosses(dead_code_every=10))
    rows = read_log(tmp_path)
    reconstruction = [row["l1"] + row["l2"] for row in rows]
    assert sum(reconstruction[-5:]) < 0.7 * sum(reconstruction[:5])
    for side in (1, 2, 4):
        assert all(0 <= row[f"usage_{side}x{side}"] <= 100 for row in rows)
    assert rows[-1]["usage_4x4"] > 0 and "dead_codes" in rows[-1]
    grid = Image.open(tmp_path / "samples" / "step-0000030.png")
    assert grid.size == (4 * 8, 2 * 8)  # inputs over reconstructions


def test_dead_code_reinitialisation_changes_only_dead_rows():
    torch.manual_seed(0)
    codebook = torch.randn(10, 4)
    before = codebook.clone()
    features = torch.randn(6, 4) + 100  # far from every code, so replaced rows are recognisable
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 7]] = True
    assert reinitialize_dead_codes(codebook, features, dead) == 2
    torch.testing.assert_close(codebook[~dead], before[~dead], rtol=0, atol=0)
    for row in codebook[dead]:
        assert any(torch.equal(row, feature) for feature in features)


@pytest.mark.end_to_end
def test_gan_path_runs_and_the_discriminator_resumes_exactly(tmp_path):
    losses = TokenizerLosses(gan=0.5, gan_start_step=1, discriminator_width=8, discriminator_layers=1)
    tokenizer_run(tmp_path / "straight", 4, losses)
    tokenizer_run(tmp_path / "resumed", 2, losses)
    tokenizer_run(tmp_path / "resumed", 4, losses)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert straight[0]["gan_weight"] == 0 and straight[-1]["gan_weight"] > 0 and straight[-1]["discriminator"] > 0
    for first, second in zip(straight, resumed):
        assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)
    expected = load_training_state(last_checkpoint(tmp_path / "straight"))["task"]["discriminator"]
    actual = load_training_state(last_checkpoint(tmp_path / "resumed"))["task"]["discriminator"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)
    model = load_file(last_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert model["quantize.ema_vocab_hit_SV"].shape == (3, 32)


def test_adaptive_weight_balances_the_gradients_at_the_last_layer():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(5, 3)
    output = layer(x)
    weight = adaptive_weight(output.square().mean(), 10 * output.mean(), layer.weight)
    reconstruction_grad = torch.autograd.grad(output.square().mean(), layer.weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(10 * output.mean(), layer.weight)[0]
    assert weight.item() == pytest.approx((reconstruction_grad.norm() / (gan_grad.norm() + 1e-4)).item(), rel=1e-5)
    assert PatchDiscriminator(1, 8, 2)(torch.randn(2, 1, 16, 16)).shape == (2, 1, 2, 2)


def test_lpips_has_the_official_layout_and_loads_from_a_local_file(tmp_path):
    module = LPIPS()
    keys = set(module.state_dict())
    assert {"scaling_layer.shift", "net.slice1.0.weight", "net.slice2.5.weight", "net.slice5.28.bias",
            "lin0.model.1.weight", "lin4.model.1.weight"} <= keys
    assert module.lin4.model[1].weight.shape == (1, 512, 1, 1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(0, 0.1)
    torch.save(module.state_dict(), tmp_path / "lpips_vgg.pth")
    loaded = load_lpips(tmp_path / "lpips_vgg.pth")
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    assert loaded(images, images).abs().max() < 1e-6
    assert (loaded(images, images.flip(-1)) > 0).all()
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "heads_only.pth")
    with pytest.raises(UserError, match="VGG16 backbone"):
        load_lpips(tmp_path / "heads_only.pth")


def test_train_vqvae_rejects_scales_that_do_not_fit_the_image(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "vqvae", "--image-size", "32", "--patch-nums", "1,2,4", "--ch-mult", "1,2,2",
              "--steps", "1", "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err.strip()
    assert message.startswith("scalegen: error:") and "end --patch-nums with 8" in message and "\n" not in message
