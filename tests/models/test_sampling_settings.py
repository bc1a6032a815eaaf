"""A model's recommended sampling settings (`scalegen.models.sampling_settings`): written by training, kept by export, read
by the loaders, `generate` and `scalegen sample` (flags override, the line printed says where each value came from);
`--weights ema|raw`; the `shipped:` names; a CoDe refiner of another tokenizer refused."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

import scalegen
import scalegen.models.dit as dit_module
from scalegen.cli.main import main
from scalegen.files import read_weights_file
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.var import VARConfig
from scalegen.runs.export import export_weights
from scalegen.runs.folder import CONFIG_FILE, SHARDED_DIR, TOKENIZER_FILE, save_checkpoint
from scalegen.runs.loading import load_dit, load_refiner, load_var
from scalegen.runs.names import SHIPPED_VAR, SHIPPED_VAR_REFINER
from scalegen.runs.weights import stored_config
from scalegen.models.sampling_settings import (
    FROM_CONFIG, FROM_FLAG, FROM_PAPER, OFFICIAL_DIT_SAMPLING, OFFICIAL_VAR_SAMPLING, SAMPLING_KEY,
)
from scalegen.train.var_task import VARTask
from tests_support import user_error, write_fashion_subset

from test_var import tiny_tokenizer

TINY_PIXEL_DIT = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                           num_classes=3)


class GuidanceSpy:
    """Stands in for `sample_with_guidance` in models/dit.py: records the plan and guidance each call got and returns
    blank images of `shape` (C, H, W), so a test sees what a command would sample with, without sampling."""

    def __init__(self, monkeypatch, shape: tuple[int, int, int]) -> None:
        self.calls: list[tuple[float, int, str]] = []
        self.shape = shape
        monkeypatch.setattr(dit_module, "sample_with_guidance", self)

    def __call__(self, model, plan, labels, cfg, *rest) -> torch.Tensor:
        self.calls.append((cfg, plan.steps, plan.sampler))
        return torch.zeros(len(labels), *self.shape)


def test_sample_dit_on_the_shipped_dit_uses_its_cfg_unless_a_flag_overrides_it(tmp_path, monkeypatch, capsys):
    spy = GuidanceSpy(monkeypatch, (1, 32, 32))
    grid = ["--classes", "0", "--per-class", "1", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]
    main(["sample", "dit", "--ckpt", "shipped:dit", *grid])
    assert spy.calls == [(2.5, 50, "euler")]
    assert f"cfg 2.5 ({FROM_CONFIG}), steps 50 ({FROM_CONFIG})" in capsys.readouterr().out
    main(["sample", "dit", "--ckpt", "shipped:dit", "--cfg", "3", "--steps", "4", *grid])
    assert spy.calls[1] == (3.0, 4, "euler")
    assert f"cfg 3.0 ({FROM_FLAG}), steps 4 ({FROM_FLAG}), sampler euler ({FROM_CONFIG})" in capsys.readouterr().out
    load_dit(scalegen.SHIPPED_DIT).generate([0])  # the Python call takes the same settings
    assert spy.calls[2] == (2.5, 50, "euler")


def test_generate_takes_each_setting_left_none_from_the_model_s_sampling():
    torch.manual_seed(0)
    var = scalegen.build_var(tiny_tokenizer(), depth=2, num_classes=5, adaln_gamma=1.0).eval()
    plain = var.generate_tokens([0, 3], seed=0)
    var.sampling = {"cfg": 3.0, "top_k": 2, "top_p": 0.5, "draws": "inverse-cdf"}
    recommended = var.generate_tokens([0, 3], seed=0)
    explicit = var.generate_tokens([0, 3], seed=0, cfg=3.0, top_k=2, top_p=0.5, draws="inverse-cdf")
    assert all(torch.equal(a, b) for a, b in zip(recommended.tokens, explicit.tokens))
    assert not all(torch.equal(a, b) for a, b in zip(recommended.tokens, plain.tokens))
    overridden = var.generate_tokens([0, 3], seed=0, cfg=1.5, top_k=0, top_p=0.0, draws="multinomial")
    assert all(torch.equal(a, b) for a, b in zip(overridden.tokens, plain.tokens))


def test_a_run_s_config_has_its_settings_and_an_export_keeps_them(tmp_path, monkeypatch, capsys):
    data = write_fashion_subset(tmp_path)
    main(["train", "dit", "--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
          "--image-size", "8", "--data", str(data), "--batch-size", "8", "--objective", "flow", "--sample-steps", "3",
          "--sample-cfg", "2", "--steps", "1", "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    written = {"cfg": 2.0, "steps": 3, "sampler": "euler"}
    assert stored_config(tmp_path / "run")[SAMPLING_KEY] == written
    main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert json.loads((tmp_path / "export" / CONFIG_FILE).read_text())[SAMPLING_KEY] == written
    spy = GuidanceSpy(monkeypatch, (1, 8, 8))
    capsys.readouterr()
    main(["sample", "dit", "--ckpt", str(tmp_path / "export"), "--classes", "0", "--per-class", "1", "--out",
          str(tmp_path / "grid.png"), "--device", "cpu"])
    assert spy.calls == [(2.0, 3, "euler")] and f"cfg 2.0 ({FROM_CONFIG})" in capsys.readouterr().out


def test_a_var_run_s_config_has_its_grid_s_settings():
    tokenizer = tiny_tokenizer()
    config = VARConfig.for_depth(1, width=32, num_classes=5, patch_nums=tokenizer.patch_nums,
                                 vocab_size=tokenizer.vocab_size, z_channels=tokenizer.z_channels)
    task = VARTask(config, tokenizer, {}, sample_cfg=2.0, sample_top_p=0.5)
    assert task.config()[SAMPLING_KEY] == {"cfg": 2.0, "top_k": 0, "top_p": 0.5, "draws": "multinomial",
                                           "refiner": None}


def test_an_official_file_falls_back_to_the_paper_s_settings(tmp_path):
    official = DiTConfig(input_size=8, patch_size=4, hidden_size=384, depth=1, num_heads=6, num_classes=3)  # DiT-S
    torch.save(DiT(official).state_dict(), tmp_path / "dit.pt")
    dit = load_dit(tmp_path / "dit.pt", vae="none")
    assert dit.sampling == OFFICIAL_DIT_SAMPLING and dit.sampling_origin == FROM_PAPER
    tokenizer = load_var(SHIPPED_VAR).tokenizer  # the official scales, so a file of weights alone loads on it
    torch.save(scalegen.build_var(tokenizer, depth=1, num_classes=10).state_dict(), tmp_path / "var.pth")
    var = load_var(tmp_path / "var.pth", tokenizer=SHIPPED_VAR)
    assert var.sampling == OFFICIAL_VAR_SAMPLING and var.sampling_origin == FROM_PAPER


def write_run_with_ema(folder) -> tuple[dict, dict]:
    """A pixel DiT run whose raw and EMA weights differ; returns (raw, ema)."""
    torch.manual_seed(0)
    raw, ema = DiT(TINY_PIXEL_DIT).state_dict(), DiT(TINY_PIXEL_DIT).state_dict()
    ema = {name: tensor + 1 if name != "pos_embed" else tensor for name, tensor in ema.items()}
    save_checkpoint(folder, 1, {"kind": "dit", "model": asdict(TINY_PIXEL_DIT)}, raw, ema, {"step": 1})
    return raw, ema


def same_weights(model: torch.nn.Module, weights: dict) -> bool:
    return all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())


def test_weights_raw_and_ema_each_load_their_file(tmp_path, capsys):
    raw, ema = write_run_with_ema(tmp_path / "run")
    assert same_weights(load_dit(tmp_path / "run", weights="raw"), raw)
    assert same_weights(load_dit(tmp_path / "run", weights="ema"), ema)
    assert same_weights(load_dit(tmp_path / "run"), ema)  # the default: the EMA where there is one
    export_weights(tmp_path / "run", tmp_path / "ema_export", half=False)
    assert same_weights(load_dit(tmp_path / "ema_export", weights="ema"), ema)
    with pytest.raises(scalegen.UserError, match="--weights raw"):
        load_dit(tmp_path / "ema_export", weights="raw")
    export_weights(tmp_path / "run", tmp_path / "raw_export", half=False, prefer_ema=False)
    assert same_weights(load_dit(tmp_path / "raw_export", weights="raw"), raw)
    message = user_error(["sample", "dit", "--ckpt", str(tmp_path / "raw_export"), "--weights", "ema", "--out",
                          str(tmp_path / "grid.png")], capsys)
    assert "holds no EMA weights" in message


@pytest.mark.parametrize("with_ema", [True, False], ids=["with ema", "without ema"])
@pytest.mark.filterwarnings("ignore:.*in a single process")  # DCP's note that one process saves, as meant
def test_weights_raw_and_ema_read_a_sharded_checkpoint_s_own_kinds(tmp_path, with_ema):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    raw, ema = DiT(TINY_PIXEL_DIT).state_dict(), DiT(TINY_PIXEL_DIT).state_dict()
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"kind": "dit", "model": asdict(TINY_PIXEL_DIT)}))
    dcp.save({"model": raw, **({"ema": ema} if with_ema else {})},
             storage_writer=dcp.FileSystemWriter(folder / SHARDED_DIR), no_dist=True)  # one rank's sharded folder
    assert same_weights(load_dit(folder, weights="raw"), raw)
    if with_ema:
        assert same_weights(load_dit(folder, weights="ema"), ema)
    else:
        with pytest.raises(scalegen.UserError, match="holds no EMA weights"):
            load_dit(folder, weights="ema")


def test_shipped_names_load_the_shipped_models_and_an_unknown_one_lists_them(tmp_path, capsys):
    assert "SHIPPED_DIT" in scalegen.__all__ and scalegen.SHIPPED_DIT.is_dir()
    assert load_var("shipped:var-refiner").config == load_var(SHIPPED_VAR_REFINER).config
    message = user_error(["sample", "var", "--ckpt", "shipped:vae", "--out", str(tmp_path / "grid.png")], capsys)
    assert all(name in message for name in ("shipped:dit", "shipped:dit-meanflow", "shipped:var",
                                            "shipped:var-refiner"))


def test_a_refiner_trained_on_another_tokenizer_is_refused_unless_asked_for(tmp_path, capsys):
    refiner = tmp_path / "refiner"
    shutil.copytree(SHIPPED_VAR_REFINER, refiner)
    weights = read_weights_file(refiner / TOKENIZER_FILE)
    save_file({name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              refiner / TOKENIZER_FILE)  # the same shapes, other weights
    var = load_var(SHIPPED_VAR)
    with pytest.raises(scalegen.UserError, match="another tokenizer"):
        load_refiner(refiner, var)
    assert load_refiner(refiner, var, any_tokenizer=True).tokenizer is var.tokenizer
    assert load_refiner(SHIPPED_VAR_REFINER, var).tokenizer is var.tokenizer
    grid = ["--classes", "0", "--per-class", "1", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]
    message = user_error(["sample", "var", "--ckpt", "shipped:var", "--refiner", str(refiner), *grid], capsys)
    assert "--refiner-any-tokenizer" in message
    main(["sample", "var", "--ckpt", "shipped:var", "--refiner", str(refiner), "--refiner-any-tokenizer", *grid])
    assert (tmp_path / "grid.png").exists()
