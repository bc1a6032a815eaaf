"""Precision: "auto" follows the hardware (detected), bf16 training tracks fp32, sampling takes a precision too."""
import pytest
import torch

from scalegen import distributed
from scalegen.distributed import autocast, resolve_precision
from scalegen.errors import UserError
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.var import VAR, VARConfig
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion

CPU = torch.device("cpu")
BF16_LOSS_TOLERANCE = 0.03  # mean relative difference of the per-step losses, bf16 against fp32


@pytest.mark.parametrize("has_units, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_means_bf16_only_on_cpus_with_bf16_matrix_units(monkeypatch, has_units, expected):
    monkeypatch.setattr(distributed, "cpu_has_bf16_matrix_units", lambda: has_units)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with autocast("auto", CPU):
        assert torch.is_autocast_enabled("cpu") == has_units
    with pytest.raises(UserError, match="unknown precision"):
        resolve_precision("fp8", CPU)


def test_detection_reads_the_cpu_flags():
    flags = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    expected = bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))
    assert distributed.cpu_has_bf16_matrix_units() == expected


def test_a_bf16_cpu_run_tracks_the_fp32_loss_of_the_same_seed(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                           num_classes=10)
        train(DiTTask(config, sample_steps=2), tiny_fashion(),
              TrainConfig(out=str(tmp_path / precision), steps=20, batch_size=16, lr=2e-3, log_every=1, device="cpu",
                          precision=precision))
        losses[precision] = torch.tensor([row["loss"] for row in read_log(tmp_path / precision)])
    relative = ((losses["bf16"] - losses["fp32"]).abs() / losses["fp32"]).mean().item()
    assert 0 < relative < BF16_LOSS_TOLERANCE  # bf16 really ran (not equal), and stays on fp32's curve


def test_sampling_takes_a_precision_and_fp32_is_the_default_computation():
    torch.manual_seed(0)
    dit = DiT(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                        num_classes=10)).eval()
    with torch.no_grad():
        for parameter in dit.parameters():  # adaLN-Zero starts at a zero output: give the network something to say
            parameter.normal_(0, 0.1)
    default = dit.generate([1, 2], cfg=2.0, steps=4, sampler="ddim", seed=0)
    assert torch.equal(dit.generate([1, 2], cfg=2.0, steps=4, sampler="ddim", seed=0, precision="fp32"), default)
    half = dit.generate([1, 2], cfg=2.0, steps=4, sampler="ddim", seed=0, precision="bf16")
    assert half.dtype == torch.float32 and 0 < (half - default).abs().mean() < 0.05
    tokenizer = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                  patch_nums=(1, 2, 4), norm_groups=4, use_attention=False, use_mid_attention=False))
    var = VAR(VARConfig(depth=2, width=32, num_heads=2, num_classes=10, patch_nums=(1, 2, 4), vocab_size=16,
                        z_channels=4), tokenizer=tokenizer.eval()).eval()
    default = var.generate([1, 2], seed=0)
    assert torch.equal(var.generate([1, 2], seed=0, precision="fp32"), default)
    assert var.generate([1, 2], seed=0, precision="bf16").shape == default.shape


def test_on_device_batches_equal_the_loader_s_items(tmp_path):
    from scalegen.data import FashionMNIST, collate
    from safetensors.torch import save_file

    from scalegen.train.caches import TokenCache
    from scalegen.train.loading import OnDevice
    items = [(3, False), (7, True), (11, True)]
    dataset = tiny_fashion(32)
    gathered = collate(OnDevice(dataset, CPU).__getitems__(items))
    expected = collate([FashionMNIST(None, 32)[item] for item in items])
    assert gathered.keys() == expected.keys() and gathered["skipped"] == expected["skipped"] == 0
    assert torch.equal(gathered["image"], expected["image"]) and torch.equal(gathered["label"], expected["label"])
    save_file({"tokens": torch.randint(0, 9, (20, 2, 5)), "labels": torch.arange(20)}, tmp_path / "tokens.safetensors")
    tokens = TokenCache(tmp_path / "tokens.safetensors")  # a cache of the earlier one-file format
    batch = OnDevice(TokenCache(tmp_path / "tokens.safetensors"), CPU).__getitems__(items)
    assert torch.equal(batch["tokens"], torch.stack([tokens[item]["tokens"] for item in items]))
    with pytest.raises(UserError, match="data-on-device"):
        OnDevice(torch.utils.data.TensorDataset(torch.zeros(2)), CPU)
