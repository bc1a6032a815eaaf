"""A DiT in the latent space of our own tokenizer: unit-variance latents, decoding equals the tokenizer's own
reconstruction, training and sampling through the command line, and `scalegen export` round trips."""
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from scalegen.cli.main import main
from scalegen.runs.folder import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE
from scalegen.runs.loading import load_dit, load_tokenizer
from scalegen.runs.weights import load_weights
from scalegen.tokenizers.codec import TokenizerCodec, measure_latent_scale
from tests_support import tiny_fashion, user_error
from test_var_training import var_cli_run  # noqa: F401  (a module fixture: a tiny `train vqvae` run and its data)

DIT_ARGUMENTS = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "1",
                 "--image-size", "8", "--batch-size", "16", "--sample-steps", "2", "--device", "cpu"]


def test_scaled_tokenizer_latents_have_unit_variance_and_decode_to_the_reconstruction(var_cli_run):
    tokenizer = load_tokenizer(var_cli_run / "vq")
    data = tiny_fashion(8)
    scale = measure_latent_scale(tokenizer, data, count=len(data))
    codec = TokenizerCodec(tokenizer, scale)
    images = torch.stack([data[(index, False)]["image"] for index in range(len(data))])  # (N, 1, 8, 8)
    latents = codec.encode(images)  # (N, 4, 4, 4)
    assert latents.shape == (len(data), 4, 4, 4)
    assert abs(latents.std().item() - 1.0) < 1e-4
    reconstruction = tokenizer.tokens_to_img(tokenizer.img_to_tokens(images))  # (N, 1, 8, 8)
    torch.testing.assert_close(codec.decode(latents), reconstruction, atol=1e-5, rtol=1e-5)


def test_train_dit_on_tokenizer_latents_samples_and_exports(var_cli_run, tmp_path):
    run = tmp_path / "dit"
    main(["train", "dit", "--tokenizer", str(var_cli_run / "vq"), *DIT_ARGUMENTS, "--data", str(var_cli_run / "data"),
          "--latent-cache", "--steps", "3", "--out", str(run)])
    stored = json.loads((run / "last.json").read_text())
    config = json.loads((run / stored["path"] / CONFIG_FILE).read_text())
    assert config["model"]["in_channels"] == 4 and config["model"]["input_size"] == 4
    assert config["tokenizer"]["latent_scale"] > 0 and (run / TOKENIZER_FILE).exists()
    main(["sample", "dit", "--ckpt", str(run), "--per-class", "2", "--steps", "3", "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 * 8, 10 * 8)

    labels = torch.arange(4)
    drawn = {}
    for name, options in (("fp32", ["--fp32"]), ("fp16", [])):
        main(["export", "--run", str(run), "--out", str(tmp_path / name), *options])
        assert (tmp_path / name / TOKENIZER_FILE).exists()
        assert json.loads((tmp_path / name / CONFIG_FILE).read_text())["tokenizer"]["source"] is None
        model = load_dit(tmp_path / name)
        drawn[name] = model.generate(labels, cfg=2.0, steps=3, sampler="ddim", seed=0)  # (4, 1, 8, 8) in [0, 1]
    for file in (MODEL_FILE, TOKENIZER_FILE):  # --fp32 keeps both files in fp32; the default halves both
        dtypes = {name: {tensor.dtype for tensor in load_file(tmp_path / name / file).values()} for name in drawn}
        assert dtypes["fp32"] == {torch.float32} and dtypes["fp16"] <= {torch.float16, torch.int64}
    original = load_dit(run).generate(labels, cfg=2.0, steps=3, sampler="ddim", seed=0)
    torch.testing.assert_close(drawn["fp32"], original, atol=0, rtol=0)
    assert (drawn["fp16"] - original).abs().max() < 0.025  # 0.05 in [-1, 1]
    main(["export", "--run", str(run), "--out", str(tmp_path / "raw"), "--fp32", "--weights", "raw"])
    raw, ema = load_file(tmp_path / "raw" / MODEL_FILE), load_file(tmp_path / "fp32" / MODEL_FILE)
    assert all(torch.equal(raw[name], value) for name, value in load_weights(run, prefer_ema=False)[1].items())
    assert not all(torch.equal(raw[name], ema[name]) for name in raw)


def test_vae_and_tokenizer_together_is_a_one_line_error(var_cli_run, tmp_path, capsys):
    message = user_error(["train", "dit", "--tokenizer", str(var_cli_run / "vq"), "--vae", "some/vae", *DIT_ARGUMENTS,
                          "--steps", "1", "--out", str(tmp_path / "run")], capsys)
    assert "--vae or --tokenizer" in message
    message = user_error(["train", "dit", "--tokenizer", str(var_cli_run / "vq"), *DIT_ARGUMENTS,
                          "--image-size", "16", "--steps", "1", "--out", str(tmp_path / "run")], capsys)
    assert "--image-size" in message


def test_export_refuses_a_folder_without_a_config(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    message = user_error(["export", "--run", str(tmp_path / "weights"), "--out", str(tmp_path / "out")], capsys)
    assert "holds no checkpoint" in message or "not a scalegen run" in message
    assert not Path(tmp_path / "out").exists()
