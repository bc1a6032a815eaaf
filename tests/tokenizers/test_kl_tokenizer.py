"""The KL tokenizer of ours (diffusers' AutoencoderKL layout, its normalisation folded exactly into a diffusers
export), VA-VAE's alignment losses, `train kl`, DiTs on it (and their exports), and REPA-E's end-to-end tuning:
the diffusion loss stops at the latents, REPA's loss reaches the tokenizer without touching the DiT's gradients."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scalegen.cli.main import main
from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.models.dit import DiTConfig
from scalegen.runs.folder import CONFIG_FILE, TOKENIZER_FILE, last_checkpoint
from scalegen.runs.loading import load_dit, load_tokenizer
from scalegen.tokenizers.codec import KLCodec, measure_normalization
from scalegen.tokenizers.kl_vae import KLVAE, KLVAEConfig, LatentNormalization, kl_divergence, to_autoencoder_kl
from scalegen.tokenizers.sd_vae import LatentCodec, load_sd_vae
from scalegen.train.alignment import FoundationAlignment, margin_cosine_loss, margin_distance_loss
from scalegen.train.dit_task import DiTTask, ObjectiveConfig
from scalegen.train.end_to_end import EndToEnd
from scalegen.train.gan_losses import ADAPTIVE_WEIGHT_EPS, ADAPTIVE_WEIGHT_MAX
from scalegen.train.kl_task import KLLosses, KLVAETask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion, training_error, write_fashion_subset
from test_recipes import tiny_encoder

TINY_KL = KLVAEConfig(in_channels=1, latent_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                      use_attention=False, image_size=8)
KL_ARGUMENTS = ["--image-size", "8", "--ch", "8", "--ch-mult", "1,2", "--norm-groups", "4", "--num-res-blocks", "1",
                "--latent-channels", "4", "--batch-size", "16", "--device", "cpu"]
DIT_ARGUMENTS = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "1",
                 "--image-size", "8", "--batch-size", "16", "--sample-steps", "2", "--device", "cpu"]


def tiny_images(count: int = 4) -> torch.Tensor:
    data = tiny_fashion(8)
    return torch.stack([data[(index, False)]["image"] for index in range(count)])  # (N, 1, 8, 8)


def test_the_kl_tokenizer_has_the_autoencoder_kl_layout_and_folds_its_normalisation_exactly():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    tokenizer = KLVAE(TINY_KL).eval()
    reference = AutoencoderKL(**TINY_KL.diffusers_config())
    assert set(tokenizer.state_dict()) == set(reference.state_dict())
    images = tiny_images()
    plain = to_autoencoder_kl(tokenizer)
    mean, logvar = tokenizer.encode_moments(images)  # (4, 4, 4, 4) each
    posterior = plain.encode(images).latent_dist
    torch.testing.assert_close(posterior.mean, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(posterior.logvar, logvar, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.decode(mean).sample, tokenizer.decode(mean), atol=1e-6, rtol=0)

    normalization = LatentNormalization(torch.tensor([0.3, -1.0, 0.0, 2.0]), torch.tensor([0.5, 2.0, 1.0, 4.0]))
    ours, folded = KLCodec(tokenizer, normalization), LatentCodec(to_autoencoder_kl(tokenizer, normalization))
    for our, their in zip(ours.encode_distribution(images), folded.encode_distribution(images)):
        torch.testing.assert_close(their, our, atol=1e-5, rtol=1e-5)
    latents = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(folded.decode(latents), ours.decode(latents), atol=1e-5, rtol=1e-5)
    assert folded.guide_all_channels and ours.guide_all_channels
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert kl_divergence(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(0.5)


def test_vavae_margin_losses(tmp_path):
    torch.manual_seed(0)
    features = torch.randn(2, 9, 5)  # (B, T, D)
    assert margin_cosine_loss(3.0 * features, features).item() == pytest.approx(0.0, abs=1e-6)
    assert margin_cosine_loss(-features, features).item() == pytest.approx(1.5)  # relu(1 − 0.5 − (−1))
    assert margin_cosine_loss(-features, features, margin=2.1).item() == 0.0  # every cosine above 1 − 2.1
    assert margin_distance_loss(2.0 * features, features).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = features[:, torch.randperm(9)]  # the same vectors at other positions: another distance matrix
    assert margin_distance_loss(shuffled, features).item() > margin_distance_loss(shuffled, features, 1.0).item() >= 0
    alignment = FoundationAlignment(4, tiny_encoder(tmp_path))
    latents = torch.randn(3, 4, 4, 4, requires_grad=True)
    cosine, distance = alignment(latents, tiny_images(3))
    (cosine + distance).backward()
    assert alignment.projection.weight.grad.abs().sum() > 0 and latents.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in alignment.encoder.parameters())  # frozen


@pytest.mark.end_to_end
def test_a_short_aligned_kl_run_lowers_the_reconstruction_loss_and_logs_its_terms(tmp_path):
    torch.manual_seed(0)
    losses = KLLosses(alignment=0.5)
    task = KLVAETask(TINY_KL, losses, tiny_images(), alignment=FoundationAlignment(4, tiny_encoder(tmp_path)))
    train(task, tiny_fashion(8), TrainConfig(out=str(tmp_path / "run"), steps=30, batch_size=16, lr=3e-3,
                                             ema_decay=0.0, log_every=1, checkpoint_every=1000, device="cpu"))
    rows = read_log(tmp_path / "run")
    reconstruction = [row["l1"] + row["l2"] for row in rows]
    assert sum(reconstruction[-5:]) < 0.6 * sum(reconstruction[:5])
    assert {"kl", "margin_cosine", "margin_distance", "alignment_weight"} <= set(rows[-1])
    assert rows[-1]["alignment_weight"] > 0
    assert Image.open(tmp_path / "run" / "samples" / "step-0000030.png").size == (4 * 8, 2 * 8)
    with pytest.raises(Exception, match="--align-encoder"):
        KLVAETask(TINY_KL, losses, tiny_images())  # a weight without an encoder


def test_the_alignment_weight_is_the_gradient_ratio_at_the_encoders_last_conv(tmp_path):
    """VA-VAE's adaptive weight: hyper-weight × ‖∇L_rec‖ / (‖∇L_align‖ + ε) at the encoder's last convolution (not the
    decoder's, where the alignment loss has no gradient); without adaptation, the hyper-weight itself."""
    torch.manual_seed(0)
    images, alignment = tiny_images(), FoundationAlignment(4, tiny_encoder(tmp_path))
    for adaptive in (True, False):
        task = KLVAETask(TINY_KL, KLLosses(alignment=0.5, adaptive_alignment=adaptive), images, alignment=alignment)
        reconstruction, mean, logvar, latents = task.model(images)  # (B, 1, 8, 8), (B, 4, 4, 4) ×3
        _, figures = task.tokenizer_loss(images, reconstruction, mean, logvar, latents)
        expected = torch.tensor(0.5, dtype=torch.float64)
        if adaptive:
            last_conv = task.model.encoder.conv_out.weight
            reconstruction_loss, _ = task.reconstruction_loss(images, reconstruction)
            aligned = sum(alignment(latents, images))
            gradients = [torch.autograd.grad(loss, last_conv, retain_graph=True)[0].double()
                         for loss in (reconstruction_loss, aligned)]
            expected = expected * gradients[0].norm() / (gradients[1].norm() + ADAPTIVE_WEIGHT_EPS)
            assert 0 < expected.item() < ADAPTIVE_WEIGHT_MAX  # the ratio itself, not its clamp
        torch.testing.assert_close(figures["alignment_weight"].double(), expected, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def kl_cli_run(tmp_path_factory) -> Path:
    """`train kl` (aligned with a tiny encoder) and a ddpm `train dit` on it, through the command line."""
    root = tmp_path_factory.mktemp("kl")
    (root / "data").mkdir()
    write_fashion_subset(root / "data")
    tiny_encoder(root)  # root/encoder.safetensors
    main(["train", "kl", *KL_ARGUMENTS, "--data", str(root / "data"), "--steps", "3", "--align-encoder",
          str(root / "encoder.safetensors"), "--out", str(root / "kl")])
    main(["train", "dit", "--tokenizer", str(root / "kl"), *DIT_ARGUMENTS, "--data", str(root / "data"),
          "--steps", "3", "--out", str(root / "dit")])
    return root


@pytest.mark.end_to_end
def test_a_dit_on_a_kl_tokenizer_samples_exports_and_exports_to_diffusers(kl_cli_run, tmp_path):
    config = json.loads((last_checkpoint(kl_cli_run / "dit") / CONFIG_FILE).read_text())
    assert config["tokenizer"]["kind"] == "klvae" and len(config["tokenizer"]["latent_scale"]) == 4
    assert config["model"]["in_channels"] == 4 and config["model"]["input_size"] == 4
    kl_config = json.loads((last_checkpoint(kl_cli_run / "kl") / CONFIG_FILE).read_text())
    assert kl_config["kind"] == "klvae" and kl_config["align_encoder"].endswith("encoder.safetensors")
    tokenizer = load_tokenizer(kl_cli_run / "kl")
    data = tiny_fashion(8)
    normalized = KLCodec(tokenizer, LatentNormalization.from_description(
        measure_normalization(tokenizer, data, count=len(data)))).encode(tiny_images(len(data)))  # (N, 4, 4, 4)
    channels = normalized.transpose(0, 1).flatten(1)  # (4, N·16)
    assert channels.mean(dim=1).abs().max() < 0.1 and (channels.std(dim=1) - 1).abs().max() < 0.1

    main(["export", "--run", str(kl_cli_run / "dit"), "--out", str(tmp_path / "export"), "--fp32"])
    labels = torch.arange(3)
    original = load_dit(kl_cli_run / "dit").generate(labels, cfg=2.0, steps=3, seed=0)  # (3, 1, 8, 8)
    exported = load_dit(tmp_path / "export").generate(labels, cfg=2.0, steps=3, seed=0)
    torch.testing.assert_close(exported, original, atol=0, rtol=0)
    main(["export", "--run", str(kl_cli_run / "dit"), "--out", str(tmp_path / "pipeline"), "--format", "diffusers"])
    assert load_dit(tmp_path / "pipeline").generate(labels, cfg=2.0, steps=3, seed=0).shape == (3, 1, 8, 8)

    main(["export", "--run", str(kl_cli_run / "kl"), "--out", str(tmp_path / "vae"), "--format", "diffusers"])
    codec = load_sd_vae(tmp_path / "vae")  # the tokenizer as a diffusers AutoencoderKL, as --vae takes it
    images = tiny_images()
    torch.testing.assert_close(codec.encode_distribution(images)[0], tokenizer.encode_moments(images)[0],
                               atol=1e-6, rtol=0)
    main(["train", "dit", "--vae", str(tmp_path / "vae"), *DIT_ARGUMENTS, "--data", str(kl_cli_run / "data"),
          "--steps", "1", "--out", str(tmp_path / "on_vae")])
    assert load_dit(tmp_path / "on_vae").config.in_channels == 4


def test_a_var_refuses_a_kl_tokenizer(kl_cli_run, tmp_path, capsys):
    message = training_error(["train", "var", "--tokenizer", str(kl_cli_run / "kl"), "--depth", "1", "--data",
                              str(kl_cli_run / "data"), "--steps", "1", "--out", str(tmp_path / "var")], capsys)
    assert "KL" in message or "no tokens" in message


def tiny_end_to_end_task(tmp_path, weight: float, losses: KLLosses) -> DiTTask:
    encoder = tiny_encoder(tmp_path)
    torch.manual_seed(0)  # the same weights each time (after whatever a first load draws)
    tokenizer = KLVAE(TINY_KL)
    codec = KLCodec(tokenizer, LatentNormalization(torch.zeros(4), torch.ones(4)))
    config = DiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_classes=10, learn_sigma=False)
    end_to_end = EndToEnd(codec, losses, tiny_images(), alignment_weight=weight)
    task = DiTTask(config, codec, objective=ObjectiveConfig(name="flow", repa_depth=1),
                   repa_encoder=encoder, end_to_end=end_to_end)
    task.prepare(1e-3)
    return task


def gradients(task: DiTTask, seed: int = 1) -> tuple[dict, dict]:
    """The DiT's and the tokenizer's gradients of one loss on a fixed batch."""
    torch.manual_seed(seed)
    batch = Batch(IMAGES, label=torch.arange(6), image=tiny_images(6))
    task.loss(task.model, batch)[0].backward()
    dit = {name: parameter.grad.clone() for name, parameter in task.model.named_parameters() if parameter.grad is not None}
    tokenizer = {name: parameter.grad for name, parameter in task.end_to_end.tokenizer.named_parameters()}
    return dit, tokenizer


def test_end_to_end_the_diffusion_loss_stops_at_the_latents_and_repa_reaches_only_the_tokenizer(tmp_path):
    silent = KLLosses(l1=0.0, l2=0.0, kl=0.0)  # no tokenizer loss of its own: what reaches it comes from the DiT
    dit_without, tokenizer_without = gradients(tiny_end_to_end_task(tmp_path, 0.0, silent))
    assert all(grad is None or grad.abs().max() == 0 for grad in tokenizer_without.values())
    dit_with, tokenizer_with = gradients(tiny_end_to_end_task(tmp_path, 1.5, silent))
    assert sum(grad.abs().sum() for grad in tokenizer_with.values() if grad is not None) > 0
    assert dit_with.keys() == dit_without.keys()
    for name, grad in dit_with.items():  # the tokenizer's REPA pass leaves the DiT's gradients untouched
        torch.testing.assert_close(grad, dit_without[name], atol=1e-6, rtol=1e-5)


def test_an_end_to_end_run_tunes_and_keeps_its_tokenizer_and_resumes(kl_cli_run, tmp_path):
    run = tmp_path / "e2e"
    command = ["train", "dit", "--tokenizer", str(kl_cli_run / "kl"), "--end-to-end", "--repa-encoder",
               str(kl_cli_run / "encoder.safetensors"), "--repa-depth", "1", "--objective", "flow", *DIT_ARGUMENTS,
               "--data", str(kl_cli_run / "data"), "--checkpoint-every", "2", "--log-every", "1", "--out", str(run)]
    main([*command, "--steps", "2"])
    main([*command, "--steps", "4"])
    checkpoint = last_checkpoint(run)
    tuned = load_file(checkpoint / TOKENIZER_FILE)
    source = load_tokenizer(kl_cli_run / "kl").state_dict()
    assert any(not torch.equal(tuned[name], source[name]) for name in source)
    assert not (run / TOKENIZER_FILE).exists()  # each checkpoint holds its own step's tokenizer
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    assert config["tokenizer"]["end_to_end"] and len(config["tokenizer"]["latent_shift"]) == 4
    rows = read_log(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert {"tokenizer_l1", "tokenizer_repa", "repa", "mse"} <= set(rows[-1])
    main(["export", "--run", str(run), "--out", str(tmp_path / "export"), "--fp32"])
    model = load_dit(tmp_path / "export")
    assert all(torch.equal(tensor, tuned[name]) for name, tensor in model.decoder.tokenizer.state_dict().items())
    assert model.generate(torch.arange(2), cfg=1.0, steps=2, seed=0).shape == (2, 1, 8, 8)


def test_end_to_end_refusals_are_one_line(kl_cli_run, tmp_path, capsys):
    base = ["train", "dit", *DIT_ARGUMENTS, "--data", str(kl_cli_run / "data"), "--steps", "1", "--end-to-end",
            "--out", str(tmp_path / "run")]
    assert "--repa-encoder" in training_error([*base, "--tokenizer", str(kl_cli_run / "kl")], capsys)
    assert "--latent-cache" in training_error([*base, "--tokenizer", str(kl_cli_run / "kl"), "--latent-cache"],
                                              capsys)
    assert "needs --tokenizer" in training_error(base, capsys)
    message = training_error(["train", "kl", *KL_ARGUMENTS, "--align-weight", "0.5", "--data",
                              str(kl_cli_run / "data"), "--steps", "1", "--out", str(tmp_path / "kl")], capsys)
    assert "--align-encoder" in message


def test_reconstruct_takes_a_kl_tokenizer(kl_cli_run, tmp_path, capsys):
    main(["reconstruct", "--tokenizer", str(kl_cli_run / "kl"), "--data", str(kl_cli_run / "data"), "--count", "16",
          "--features", "fmnist", "--out", str(tmp_path / "pairs.png"), "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 16 and report["psnr"] > 0 and report["fid"] >= 0
    assert Image.open(tmp_path / "pairs.png").size == (2 * 8 * 8, 2 * 8)
