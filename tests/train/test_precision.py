"""Precision: "auto" follows the hardware (detected), bf16 training tracks fp32, sampling takes a precision too."""
import pytest
import torch

from scalegen import mixed_precision
from scalegen.errors import UserError
from scalegen.mixed_precision import autocast, resolve_precision
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.var import VAR, VARConfig
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import perturbed, tiny_fashion

CPU = torch.device("cpu")
BF16_LOSS_TOLERANCE = 0.03  # mean relative difference of the per-step losses, bf16 against fp32


@pytest.mark.parametrize("has_units, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_means_bf16_only_on_cpus_with_bf16_matrix_units(monkeypatch, has_units, expected):
    monkeypatch.setattr(mixed_precision, "cpu_has_bf16_matrix_units", lambda: has_units)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with autocast("auto", CPU):
        assert torch.is_autocast_enabled("cpu") == has_units
    with pytest.raises(UserError, match="unknown precision"):
        resolve_precision("fp8", CPU)


@pytest.fixture
def fresh_detection():
    """`cpu_has_bf16_matrix_units`, asking the hardware anew at each call (it keeps its first answer for the
    process), with the kept answer forgotten after the test too."""
    detect = mixed_precision.cpu_has_bf16_matrix_units
    forget = getattr(detect, "cache_clear", lambda: None)

    def detect_anew() -> bool:
        forget()
        return detect()  # kept until the next call: resolve_precision("auto", CPU) sees the same answer

    yield detect_anew
    forget()


@pytest.mark.parametrize("flags, expected", [
    ({"amx_bf16": True, "amx_tile": True, "avx2": True}, True),  # Sapphire Rapids and later: AMX
    ({"amx_bf16": False, "avx512_bf16": True, "avx2": True}, True),  # Cooper Lake, Zen 4: AVX512-BF16
    ({"amx_bf16": False, "avx512_bf16": False, "avx512f": True, "avx2": True}, False),  # Skylake-X: no bf16 units
    ({"avx2": True, "amx_fp16": True, "amx_int8": True}, False),  # AMX without its bf16 part does not count
    ({}, False),  # a CPU torch knows nothing about
], ids=["amx", "avx512-bf16", "avx512-without-bf16", "amx-without-bf16", "unknown"])
def test_detection_answers_from_torch_s_cpu_capabilities(monkeypatch, fresh_detection, flags, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags), raising=False)
    assert fresh_detection() is expected
    assert resolve_precision("auto", CPU) == ("bf16" if expected else "fp32")


@pytest.mark.parametrize("flags, expected", [("fpu sse2 avx2 avx512f amx_bf16 amx_tile", True),
                                             ("fpu sse2 avx2 avx512f avx512_bf16", True),
                                             ("fpu sse2 avx2 avx512f avx512_fp16 avx512_vnni", False)],
                         ids=["amx", "avx512-bf16", "avx512-without-bf16"])
def test_without_torch_s_report_detection_reads_proc_cpuinfo(monkeypatch, tmp_path, fresh_detection, flags, expected):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpu_info = tmp_path / "cpuinfo"
    cpu_info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(mixed_precision, "CPU_INFO", cpu_info)
    assert fresh_detection() is expected
    monkeypatch.setattr(mixed_precision, "CPU_INFO", tmp_path / "absent")
    assert fresh_detection() is False  # no report and no /proc: fp32, the safe answer


def test_torch_s_report_and_the_kernel_s_flags_agree_on_this_machine(monkeypatch, fresh_detection):
    if not mixed_precision.CPU_INFO.exists() or not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("needs both torch's capability report and /proc/cpuinfo")
    from_torch = fresh_detection()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert fresh_detection() == from_torch  # two independent sources, one answer


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *arguments, **options: supported)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"


@pytest.mark.end_to_end
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
    dit = perturbed(DiT(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=10)).eval())
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
    from dataclasses import fields

    from safetensors.torch import save_file

    from scalegen.data.batch import collate
    from scalegen.data.caches import TokenCache
    from scalegen.data.fashion_mnist import FashionMNIST
    from scalegen.data.names import IMAGES
    from scalegen.data.sampling import OnDevice

    def held(batch) -> set[str]:
        return {field.name for field in fields(batch) if getattr(batch, field.name) is not None}

    items = [(3, False), (7, True), (11, True)]
    dataset = tiny_fashion(32)
    gathered = collate(OnDevice(dataset, CPU).__getitems__(items), IMAGES)
    expected = collate([FashionMNIST(None, 32)[item] for item in items], IMAGES)
    assert held(gathered) == held(expected) and gathered.skipped == expected.skipped == 0
    assert gathered.form == expected.form == IMAGES
    assert torch.equal(gathered.image, expected.image) and torch.equal(gathered.label, expected.label)
    unflipped = collate(OnDevice(dataset, CPU).__getitems__([(index, False) for index, _ in items]), IMAGES)
    assert torch.equal(gathered.image[0], unflipped.image[0])  # item (3, False) as it is
    assert torch.equal(gathered.image[1:], unflipped.image[1:].flip(-1))  # the flipped items are mirrored
    assert not torch.equal(gathered.image[1:], unflipped.image[1:])  # (and mirroring changes them)
    save_file({"tokens": torch.randint(0, 9, (20, 2, 5)), "labels": torch.arange(20)}, tmp_path / "tokens.safetensors")
    tokens = TokenCache(tmp_path / "tokens.safetensors")  # a cache of the earlier one-file format
    batch = OnDevice(TokenCache(tmp_path / "tokens.safetensors"), CPU).__getitems__(items)
    assert torch.equal(batch.tokens, torch.stack([tokens[item]["tokens"] for item in items]))
    with pytest.raises(UserError, match="data-on-device"):
        OnDevice(torch.utils.data.TensorDataset(torch.zeros(2)), CPU)
