"""DiT ⇄ diffusers: a tiny random `DiTTransformer2DModel` loads as a scalegen DiT and `scalegen export --format
diffusers` writes a folder diffusers loads; the weights convert exactly both ways. The outputs agree exactly once
diffusers' timestep embedding uses the official frequencies (its default shifts them: exp(-ln 10⁴·i/(half-1))
instead of /half), and within 5 % of the output's scale with its default."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

import scalegen  # noqa: E402
from scalegen.cli.main import main  # noqa: E402
from scalegen.models.dit import DiTConfig  # noqa: E402
from scalegen.train.dit_task import DiTTask  # noqa: E402
from scalegen.train.trainer import TrainConfig, train  # noqa: E402
from tests_support import tiny_fashion  # noqa: E402

DEFAULT_TOLERANCE = 0.05  # relative to the output's largest magnitude, with diffusers' shifted frequencies


def outputs(ours, theirs, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, size, size, generator=generator)  # (3, C, H, W)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 3, 5])
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


def test_export_format_diffusers_round_trips(tmp_path, capsys):
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    train(DiTTask(config, sample_steps=2), tiny_fashion(), TrainConfig(out=str(tmp_path / "run"), steps=3, batch_size=16,
                                                                      lr=2e-3, device="cpu"))
    main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "pipeline"), "--format", "diffusers"])
    assert {path.name for path in (tmp_path / "pipeline").iterdir()} >= {"transformer", "scheduler", "model_index.json"}
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "pipeline", subfolder="transformer").eval()
    ours = scalegen.load_dit(tmp_path / "run")
    official_frequencies(theirs)
    mine, reference = outputs(ours, theirs, 1, 8)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    back = scalegen.load_dit(tmp_path / "pipeline")  # --ckpt takes the folder too
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0)


def test_per_block_embedders_that_differ_are_refused(tmp_path):
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=6)
    theirs.save_pretrained(tmp_path / "transformer")
    with pytest.raises(scalegen.UserError, match="differs from block 0"):
        scalegen.load_dit(tmp_path, vae="none")

