"""DiT ⇄ diffusers: a tiny random `DiTTransformer2DModel` loads as a scalegen DiT, and `scalegen export --format
diffusers` writes a folder that diffusers' `DiTPipeline` runs (class names, guidance with 3 classes) and scalegen
loads back; the weights convert exactly both ways. The outputs agree exactly once diffusers' timestep embedding uses
the official frequencies (its default shifts them: exp(-ln 10⁴·i/(half-1)) instead of /half), and within 5 % of the
output's scale with its default. What the pipeline cannot run is refused in one line, before anything is written."""
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTPipeline, DiTTransformer2DModel  # noqa: E402

import scalegen  # noqa: E402
from scalegen.cli.main import main  # noqa: E402
from scalegen.classes import class_ids  # noqa: E402
from scalegen.models.dit import DiT, DiTConfig  # noqa: E402
from scalegen.models.dit_diffusers import PIPELINE_NULL_CLASS, padded_class_table  # noqa: E402
from scalegen.runs.folder import save_checkpoint  # noqa: E402
from scalegen.tokenizers.sd_vae import LATENT_SCALE  # noqa: E402
from tests_support import save_tiny_vae, user_error  # noqa: E402

TINY_LATENT_DIT = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                            num_classes=3)
CLASSES = ["sneaker", "boots", "bag"]
IMAGE_SIZE = 32  # the tiny VAE's 4×4 latents, decoded

DEFAULT_TOLERANCE = 0.05  # relative to the output's largest magnitude, with diffusers' shifted frequencies


def outputs(ours, theirs, channels: int, size: int, labels=(0, 3, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, size, size, generator=generator)  # (3, C, H, W)
    t, y = torch.tensor([1, 500, 999]), torch.tensor(labels)
    with torch.no_grad():
        return ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample


def official_frequencies(model: DiTTransformer2DModel) -> None:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def test_a_random_diffusers_dit_loads_as_a_scalegen_dit(tmp_path):
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=6,
                                   norm_eps=1e-6).eval()
    for parameter in theirs.parameters():  # diffusers zero-initialises the adaLN and output layers: make them count
        parameter.data.normal_(0, 0.05)
    shared = theirs.transformer_blocks[0].norm1.emb.state_dict()
    for block in theirs.transformer_blocks[1:]:  # converted DiTs share one embedder (the official layout)
        block.norm1.emb.load_state_dict(shared)
    theirs.save_pretrained(tmp_path / "transformer")
    ours = scalegen.load_dit(tmp_path, vae="none")
    assert (ours.config.hidden_size, ours.config.depth, ours.config.num_classes) == (32, 2, 6)
    mine, reference = outputs(ours, theirs, 4, 8)
    assert (mine - reference).abs().max() <= DEFAULT_TOLERANCE * reference.abs().max()
    official_frequencies(theirs)
    mine, reference = outputs(ours, theirs, 4, 8)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def write_latent_run(folder: Path, vae_folder: str | None, config: DiTConfig = TINY_LATENT_DIT, **stored) -> None:
    """A run of a DiT in the tiny VAE's latents with random weights (the zero-initialised layers made to count)."""
    torch.manual_seed(0)
    model = DiT(config)
    for name, parameter in model.named_parameters():
        if name != "pos_embed":  # the fixed table diffusers computes itself
            parameter.data.normal_(0, 0.05)
    config_json = {"kind": "dit", "model": asdict(config), "vae": vae_folder, "classes": CLASSES,
                   "objective": {"name": "ddpm"}}
    save_checkpoint(folder, 1, {**config_json, **stored}, model.state_dict(), model.state_dict(), {"step": 1})


def export(run: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--run", str(run), "--out", str(out), "--format", "diffusers", *extra]


def test_export_format_diffusers_round_trips(tmp_path, vae):
    write_latent_run(tmp_path / "run", str(vae))
    main(export(tmp_path / "run", tmp_path / "pipeline"))
    assert {path.name for path in (tmp_path / "pipeline").iterdir()} >= {
        "transformer", "scheduler", "vae", "model_index.json", "README.md"}
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "pipeline", subfolder="transformer").eval()
    ours = scalegen.load_dit(tmp_path / "run")
    official_frequencies(theirs)
    mine, reference = outputs(ours, theirs, 4, 4, labels=(0, 1, 2))
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    back = scalegen.load_dit(tmp_path / "pipeline")  # --ckpt takes the folder too
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0)
    assert back.class_names == CLASSES and class_ids("boots", back.class_names) == [1]  # `--classes boots` works
    null = torch.full((3,), TINY_LATENT_DIT.num_classes)  # DiTPipeline's null label 1000 finds our null class
    x, t = torch.randn(3, 4, 4, 4), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=torch.full((3,), PIPELINE_NULL_CLASS)).sample,
                                   ours(x, t, null), atol=1e-5, rtol=1e-5)


def test_per_block_embedders_that_differ_are_refused(tmp_path):
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=6)
    theirs.save_pretrained(tmp_path / "transformer")
    with pytest.raises(scalegen.UserError, match="differs from block 0"):
        scalegen.load_dit(tmp_path, vae="none")


def test_diffusers_pipeline_runs_the_export_with_class_names_and_guidance(tmp_path, vae):
    write_latent_run(tmp_path / "run", str(vae))
    main(export(tmp_path / "run", tmp_path / "pipeline"))
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.scheduler.config.variance_type == "fixed_small"  # the pipeline drops the learned variance channels
    assert pipe.vae.config.scaling_factor == LATENT_SCALE
    labels = pipe.get_label_ids(["boots", "bag"])
    assert labels == [1, 2]
    official_frequencies(pipe.transformer)  # so its outputs match scalegen's DiT's (within float rounding)
    ours, null = scalegen.load_dit(tmp_path / "run"), torch.full((2,), TINY_LATENT_DIT.num_classes)
    unguided = first_step(pipe, labels, 1.0)
    assert unguided["class_labels"].tolist() == labels  # no unconditional half
    assert torch.equal(unguided["model_output"], unguided["network"][:, :4])  # ε as the network gave it
    guided = first_step(pipe, labels, 4.0)
    assert guided["class_labels"].tolist() == labels + [PIPELINE_NULL_CLASS] * 2
    conditional, unconditional = guided["network"][:2, :4], guided["network"][2:, :4]  # (2, 4, 4, 4) each
    with torch.no_grad():  # the unconditional half is scalegen's null class
        torch.testing.assert_close(unconditional, ours(guided["latents"][2:], guided["timesteps"][2:], null)[:, :4],
                                   atol=1e-5, rtol=1e-5)
    expected = unconditional + 4.0 * (conditional - unconditional)
    assert torch.equal(guided["model_output"][:2], expected) and torch.equal(guided["model_output"][2:], expected)
    assert not torch.allclose(expected, conditional)  # guidance moved it
    assert "guidance_scale" in (tmp_path / "pipeline" / "README.md").read_text()


def first_step(pipe, labels: list[int], guidance: float) -> dict[str, torch.Tensor]:
    """Run the pipeline 2 steps at `guidance`; returns what its first step saw: the network's inputs ("latents",
    "timesteps", "class_labels") and output ("network"), and the model output handed to the scheduler."""
    seen: dict[str, torch.Tensor] = {}
    forward, step = pipe.transformer.forward, pipe.scheduler.step

    def spied_forward(latents, timestep, class_labels, **kwargs):
        output = forward(latents, timestep=timestep, class_labels=class_labels, **kwargs)
        if "network" not in seen:
            seen.update(latents=latents.clone(), timesteps=timestep.clone(), class_labels=class_labels.clone(),
                        network=output.sample.clone())
        return output

    def spied_step(model_output, timestep, sample, **kwargs):
        seen.setdefault("model_output", model_output.clone())
        return step(model_output, timestep, sample, **kwargs)

    pipe.transformer.forward, pipe.scheduler.step = spied_forward, spied_step
    try:
        generator = torch.Generator().manual_seed(0)
        images = pipe(labels, guidance_scale=guidance, num_inference_steps=2, generator=generator, output_type="pt").images
    finally:
        del pipe.transformer.forward, pipe.scheduler.step
    assert images.shape == (len(labels), 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    return seen


def test_a_dit_without_learned_variance_keeps_its_fixed_large_variance(tmp_path, vae):
    write_latent_run(tmp_path / "run", None, replace(TINY_LATENT_DIT, learn_sigma=False))
    main(export(tmp_path / "run", tmp_path / "pipeline", "--vae", str(vae)))  # --vae supplies what the run lacks
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.scheduler.config.variance_type == "fixed_large"
    images = pipe([0], guidance_scale=2.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_class_tables_are_padded_to_the_pipelines_null_label():
    table = torch.randn(4, 8)  # 3 classes and the null row
    padded = padded_class_table(table, 3)
    assert padded.shape == (PIPELINE_NULL_CLASS + 1, 8) and torch.equal(padded[:3], table[:3])
    assert torch.equal(padded[3:], table[3:].expand(PIPELINE_NULL_CLASS + 1 - 3, -1))
    assert torch.equal(padded_class_table(table[:3], 3)[PIPELINE_NULL_CLASS], torch.zeros(8))  # no label dropout
    many = torch.randn(1202, 8)  # more classes than DiTPipeline's null label: nothing to pad
    assert torch.equal(padded_class_table(many, 1201), many)


@pytest.mark.parametrize("in_channels, stored, expected", [
    (1, {"vae": None}, "pixel-space DiT"),
    (4, {"objective": {"name": "flow"}}, "flow objective"),
    (4, {"tokenizer": {"source": "runs/vqvae", "latent_scale": 1.0}}, "VQ tokenizer"),
    (4, {"kind": "var"}, "holds a VAR model"),
    (4, {"vae": None}, "names no SD-VAE; pass --vae"),
    (4, {"vae": "missing-vae"}, "not found"),
])
def test_what_the_pipeline_cannot_run_is_refused_before_anything_is_written(tmp_path, vae, capsys, in_channels, stored,
                                                                             expected):
    objective = stored.get("objective", {}).get("name", "ddpm")
    config = replace(TINY_LATENT_DIT, in_channels=in_channels, objective=objective, learn_sigma=objective == "ddpm")
    write_latent_run(tmp_path / "run", str(vae), config, **stored)
    message = user_error(export(tmp_path / "run", tmp_path / "pipeline"), capsys)
    assert expected in message
    if expected not in ("not found", "names no SD-VAE; pass --vae"):
        assert f"scalegen export --run {tmp_path / 'run'} --out FOLDER" in message
    assert not (tmp_path / "pipeline").exists()


def test_a_vae_flag_that_names_no_autoencoder_is_refused(tmp_path, vae, capsys):
    write_latent_run(tmp_path / "run", str(vae))
    message = user_error(export(tmp_path / "run", tmp_path / "pipeline", "--vae", str(tmp_path / "run")), capsys)
    assert "holds no diffusers AutoencoderKL" in message and not (tmp_path / "pipeline").exists()
    message = user_error(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--vae", str(vae)],
                         capsys)
    assert "--format diffusers" in message


def test_more_classes_than_the_pipelines_null_label_export_without_guidance(tmp_path, vae):
    config = replace(TINY_LATENT_DIT, num_classes=PIPELINE_NULL_CLASS + 1)
    write_latent_run(tmp_path / "run", str(vae), config)
    main(export(tmp_path / "run", tmp_path / "pipeline"))
    assert scalegen.load_dit(tmp_path / "pipeline").config == config
    assert "pass `guidance_scale=1`" in (tmp_path / "pipeline" / "README.md").read_text()


def test_the_export_s_readme_runs_the_pipeline_at_the_model_s_recommended_settings(tmp_path, vae):
    write_latent_run(tmp_path / "run", str(vae), sampling={"cfg": 3.0, "steps": 25, "sampler": "ddim"})
    main(export(tmp_path / "run", tmp_path / "pipeline"))
    assert "guidance_scale=3.0, num_inference_steps=25" in (tmp_path / "pipeline" / "README.md").read_text()
