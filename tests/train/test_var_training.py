"""VAR training and its commands: cross-entropy falls, resume is exact, sample/edit write the right files,
edits keep the unmasked tokens, bad input is a one-line error."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.runs.folder import TOKENIZER_FILE, save_checkpoint
from scalegen.runs.loading import load_tokenizer, load_var
from scalegen.runs.weights import load_weights
from scalegen.train.run_log import read_log
from scalegen.errors import UserError
from scalegen.train.trainer import TrainConfig, train
from scalegen.models.var import VAR, VARConfig
from scalegen.models.var_edit import box_mask
from scalegen.files import json_config
from scalegen.train.var_task import VARTask
from scalegen.tokenizers.vqvae import VQVAE
from tests_support import tiny_fashion, user_error, without_progress_bars, write_fashion_subset
from test_tokenizer_training import TINY_TOKENIZER

TINY_VAR = dict(depth=1, width=32, num_heads=2, num_classes=10, patch_nums=(1, 2, 4), vocab_size=32, z_channels=4)


def tokenizer_folder(folder: Path) -> VQVAE:
    """A random tiny tokenizer saved as a `train vqvae` run."""
    torch.manual_seed(0)
    tokenizer = VQVAE(TINY_TOKENIZER)
    stored = {"kind": "vqvae", "model": json_config(TINY_TOKENIZER)}
    save_checkpoint(folder, 1, stored, tokenizer.state_dict(), tokenizer.state_dict(), {"step": 1})
    return tokenizer.eval()


def var_run(out: Path, steps: int, tokenizer: VQVAE) -> None:
    torch.manual_seed(0)
    task = VARTask(VARConfig(**TINY_VAR), tokenizer, {"model": json_config(TINY_TOKENIZER)}, sample_cfg=2.0)
    # A constant lr (no warm-up, no decay), so a run stopped early and resumed sees the same schedule.
    config = TrainConfig(out=str(out), steps=steps, batch_size=16, lr=3e-3, warmup_steps=0, lr_decay_to=1.0,
                         log_every=1, checkpoint_every=1000, device="cpu")
    train(task, tiny_fashion(8), config)


@pytest.fixture(scope="module")
def var_cli_run(tmp_path_factory) -> Path:
    """`train vqvae` then `train var --token-cache` through the command line (a few steps each)."""
    root = tmp_path_factory.mktemp("var")
    (root / "data").mkdir()
    write_fashion_subset(root / "data")
    tokenizer_args = ["--image-size", "8", "--patch-nums", "1,2,4", "--ch", "8", "--ch-mult", "1,2", "--norm-groups", "4",
                      "--num-res-blocks", "1", "--no-attention", "--share-quant-resi", "3", "--vocab-size", "32",
                      "--z-channels", "4"]
    main(["train", "vqvae", *tokenizer_args, "--data", str(root / "data"), "--steps", "2", "--batch-size", "16", "--out", str(root / "vq"),
          "--device", "cpu"])
    main(["train", "var", "--tokenizer", str(root / "vq"), "--depth", "1", "--width", "32", "--num-heads", "2",
          "--token-cache", "--data", str(root / "data"), "--steps", "3", "--batch-size", "16", "--log-every", "1", "--out", str(root / "var"),
          "--device", "cpu"])
    return root


def test_a_short_var_run_lowers_the_cross_entropy(tmp_path):
    var_run(tmp_path, 25, tokenizer_folder(tmp_path / "vq"))
    rows = read_log(tmp_path)
    losses = [row["loss"] for row in rows]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    for side in (1, 2, 4):
        assert f"loss_{side}x{side}" in rows[-1] and f"accuracy_{side}x{side}" in rows[-1]
    assert 0 < rows[-1]["accuracy"] <= 1
    assert Image.open(tmp_path / "samples" / "step-0000025.png").size == (8 * 8, 10 * 8)


@pytest.mark.end_to_end
def test_var_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    tokenizer = tokenizer_folder(tmp_path / "vq")
    var_run(tmp_path / "straight", 4, tokenizer)
    var_run(tmp_path / "resumed", 2, tokenizer)
    var_run(tmp_path / "resumed", 4, tokenizer)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for first, second in zip(straight, resumed):
        assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)


def test_the_var_recipe_exempts_norms_biases_and_embeddings_from_weight_decay(tmp_path):
    task = VARTask(VARConfig(**TINY_VAR), tokenizer_folder(tmp_path), {})
    decay, no_decay = task.parameter_groups(0.05)
    names = {id(parameter): name for name, parameter in task.model.named_parameters()}
    exempt = {names[id(parameter)] for parameter in no_decay["params"]}
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias"} <= exempt
    assert "class_emb.weight" in {names[id(parameter)] for parameter in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_sample_var_writes_a_grid_and_an_adm_npz(var_cli_run, tmp_path):
    run = var_cli_run / "var"
    assert (run / TOKENIZER_FILE).exists() and (run / "tokens" / "manifest.json").exists()
    assert "loss_4x4" in read_log(run)[-1]
    main(["sample", "var", "--ckpt", str(run), "--classes", "0,3,9", "--per-class", "2", "--out", str(tmp_path / "g.png"),
          "--device", "cpu"])
    assert Image.open(tmp_path / "g.png").size == (2 * 8, 3 * 8)
    main(["sample", "var", "--ckpt", str(run), "--num-samples", "5", "--batch-size", "2", "--out", str(tmp_path / "s.npz"),
          "--device", "cpu"])
    samples = np.load(tmp_path / "s.npz")
    assert samples["arr_0"].shape == (5, 8, 8, 3) and samples["arr_0"].dtype == np.uint8
    assert samples["labels"].shape == (5,)


def test_edit_var_writes_the_result_the_input_and_the_mask(var_cli_run, tmp_path):
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "edited.png"
    main(["edit", "var", "--ckpt", str(var_cli_run / "var"), "--image", str(tmp_path / "in.png"), "--box", "2,2,6,6",
          "--mode", "inpaint", "--class", "3", "--out", str(out), "--device", "cpu"])
    for path in (out, tmp_path / "edited_input.png", tmp_path / "edited_mask.png"):
        assert Image.open(path).size == (8, 8)
    mask = np.array(Image.open(tmp_path / "edited_mask.png"))
    assert mask[3, 3] == 255 and mask[0, 0] == 0  # white = regenerated box


def test_editing_keeps_the_unmasked_tokens_exactly(tmp_path):
    tokenizer = tokenizer_folder(tmp_path)
    torch.manual_seed(0)
    model = VAR(VARConfig(**TINY_VAR), tokenizer=tokenizer).eval()
    images = torch.stack([tiny_fashion(8)[(index, False)]["image"] for index in range(2)])  # (2, 1, 8, 8)
    source = tokenizer.img_to_tokens(images)
    for mode in ("inpaint", "outpaint"):
        keep = box_mask(8, (2, 2, 6, 6), 4, mode)  # (4, 4)
        edited = model.generate_tokens([1, 10], cfg=2.0, seed=0, source_tokens=source, keep_mask=keep).tokens
        finest_keep = keep.flatten().bool()  # (16,)
        assert torch.equal(edited[-1][:, finest_keep], source[-1][:, finest_keep])
        assert torch.equal(edited[0], source[0])  # the 1×1 scale is always the source's


def test_bad_edit_and_sample_inputs_are_one_line_errors(var_cli_run, tmp_path, capsys):
    run = str(var_cli_run / "var")
    Image.new("L", (8, 8)).save(tmp_path / "in.png")
    edit = ["edit", "var", "--ckpt", run, "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png"),
            "--device", "cpu"]
    assert "not inside" in user_error([*edit, "--box", "4,4,2,9"], capsys)
    assert "out of range" in user_error([*edit, "--box", "0,0,4,4", "--class", "10"], capsys)
    assert "out of range" in user_error(["sample", "var", "--ckpt", run, "--classes", "12", "--out",
                                         str(tmp_path / "g.png"), "--device", "cpu"], capsys)
    message = user_error(["train", "var", "--tokenizer", str(tmp_path / "missing"), "--steps", "1",
                          "--out", str(tmp_path / "v")], capsys)
    assert "tokenizer" in message and "not found" in message
    # A VAR run is a tokenizer source too: its tokenizer, to train another model in the same token space.
    assert load_tokenizer(run).state_dict().keys() == load_var(run).tokenizer.state_dict().keys()
    torch.testing.assert_close(load_tokenizer(run).state_dict(), load_var(run).tokenizer.state_dict())


def test_a_var_run_without_its_tokenizer_copy_asks_for_one(var_cli_run, tmp_path, capsys):
    stored, weights = load_weights(var_cli_run / "var")
    stored["tokenizer"]["source"] = str(tmp_path / "gone")
    save_checkpoint(tmp_path / "orphan", 1, stored, weights, weights, {"step": 1})
    message = user_error(["sample", "var", "--ckpt", str(tmp_path / "orphan"), "--out", str(tmp_path / "g.png"),
                          "--device", "cpu"], capsys)
    assert "pass --tokenizer" in message
    model = load_var(tmp_path / "orphan", str(var_cli_run / "vq"))
    assert model.tokenizer.config.vocab_size == 32


def test_official_scales_are_read_off_the_number_of_positions():
    from scalegen.runs.loading import official_patch_nums
    from scalegen.tokenizers.vqvae import PATCH_NUMS_256, PATCH_NUMS_512

    assert official_patch_nums({"pos_1LC": torch.zeros(1, 680, 1)}) == PATCH_NUMS_256
    assert official_patch_nums({"pos_1LC": torch.zeros(1, 2240, 1)}) == PATCH_NUMS_512
    with pytest.raises(UserError, match="neither official scale set"):
        official_patch_nums({"pos_1LC": torch.zeros(1, 30, 1)})


@pytest.mark.multiprocess
def test_two_process_torchrun_trains_the_tokenizer_then_the_var(var_cli_run, tmp_path):
    """Every new train command runs unchanged under torchrun (gloo): codebook hits summed, dead codes broadcast."""
    import os
    import subprocess
    import sys

    environment = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalegen"]
    tokenizer = ["train", "vqvae", "--image-size", "8", "--patch-nums", "1,2,4", "--ch", "8", "--ch-mult", "1,2",
                 "--norm-groups", "4", "--num-res-blocks", "1", "--no-attention", "--share-quant-resi", "3",
                 "--vocab-size", "32", "--z-channels", "4", "--dead-code-every", "1", "--gan-weight", "0.1",
                 "--disc-layers", "1", "--data", str(var_cli_run / "data"), "--steps", "2", "--batch-size", "16", "--log-every", "1",
                 "--device", "cpu", "--out", str(tmp_path / "vq")]
    transformer = ["train", "var", "--tokenizer", str(tmp_path / "vq"), "--depth", "1", "--width", "32",
                   "--num-heads", "2", "--data", str(var_cli_run / "data"), "--steps", "2", "--batch-size", "16",
                   "--log-every", "1", "--device", "cpu", "--out", str(tmp_path / "var")]
    for command in (tokenizer, transformer):
        completed = subprocess.run(launcher + command, env=environment, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, without_progress_bars(completed.stderr)
    assert len(read_log(tmp_path / "vq")) == 2 and len(read_log(tmp_path / "var")) == 2
    assert load_weights(tmp_path / "var")[0]["kind"] == "var"


def test_a_discriminator_too_deep_for_the_images_is_a_one_line_error(var_cli_run, tmp_path, capsys):
    message = user_error(["train", "vqvae", "--image-size", "8", "--patch-nums", "1,2,4", "--ch", "8", "--ch-mult", "1,2",
                          "--norm-groups", "4", "--no-attention", "--share-quant-resi", "3", "--gan-weight", "0.1",
                          "--data", str(var_cli_run / "data"), "--steps", "1", "--out", str(tmp_path / "vq")], capsys)
    assert "too small for a 3-layer discriminator" in message


def test_a_var_and_a_tokenizer_fine_tune_from_their_runs(var_cli_run, tmp_path):
    tokenizer_args = ["--image-size", "8", "--patch-nums", "1,2,4", "--ch", "8", "--ch-mult", "1,2", "--norm-groups", "4",
                      "--num-res-blocks", "1", "--no-attention", "--share-quant-resi", "3", "--vocab-size", "32",
                      "--z-channels", "4", "--data", str(var_cli_run / "data"), "--batch-size", "16", "--device", "cpu"]
    main(["train", "vqvae", *tokenizer_args, "--steps", "1", "--lr", "0", "--init-from", str(var_cli_run / "vq"),
          "--out", str(tmp_path / "vq")])
    start, tuned = load_weights(var_cli_run / "vq")[1], load_weights(tmp_path / "vq")[1]
    assert all(torch.equal(start[name], tuned[name]) for name in start if "ema_vocab_hit" not in name)  # lr 0
    main(["train", "var", "--tokenizer", str(var_cli_run / "vq"), "--depth", "1", "--width", "32", "--num-heads", "2",
          "--data", str(var_cli_run / "data"), "--steps", "1", "--batch-size", "16", "--device", "cpu",
          "--init-from", str(var_cli_run / "var"), "--out", str(tmp_path / "var")])
    stored = load_weights(tmp_path / "var")[0]
    assert stored["init_from"]["reinitialized"] == [] and stored["init_from"]["path"].endswith("var")
