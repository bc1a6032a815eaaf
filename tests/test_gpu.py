"""GPU-only checks: bf16 autocast, the flash attention kernel, torch.compile, a bf16 training run, and NCCL DDP
(two GPUs).

They skip on a machine without CUDA (CI) and run on the lent GPU: `.venv/bin/python -m pytest tests/test_gpu.py`.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from test_dit import tiny_dit
from test_train import tiny_task
from test_var import PATCH_NUMS, tiny_var
from tests_support import TESTS, tiny_fashion, torchrun, without_progress_bars

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
BF16_TOLERANCE = 0.05  # bf16 keeps 8 bits of mantissa: a few per cent of the output's spread


def dit_inputs(model, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """Noisy latents, timesteps and labels on the GPU for `model`."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    config = model.config
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=CUDA, generator=generator)
    return x, torch.randint(0, 1000, (batch,), device=CUDA, generator=generator), torch.arange(batch, device=CUDA) % 10


def wide_dit():
    """A DiT with 64-wide heads, as the flash kernel wants, and AdaLN gates away from zero."""
    torch.manual_seed(0)
    model = tiny_dit(hidden_size=128, num_heads=2).to(CUDA).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def test_bf16_autocast_matches_fp32():
    model = wide_dit()
    inputs = dit_inputs(model)
    with torch.no_grad():
        expected = model(*inputs)  # (B, 2C, H, W)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            actual = model(*inputs)
    assert relative_error(actual, expected) < BF16_TOLERANCE


def test_flash_attention_kernel_runs_the_dit_and_matches_the_math_kernel():
    model = wide_dit()
    inputs = dit_inputs(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
            flash = model(*inputs)
        with sdpa_kernel(SDPBackend.MATH):
            math = model(*inputs)
    assert relative_error(flash, math.float()) < BF16_TOLERANCE


def test_compiled_dit_matches_eager():
    model = wide_dit()
    inputs = dit_inputs(model)
    with torch.no_grad():
        eager = model(*inputs)
        compiled = torch.compile(model)(*inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_kv_cached_generation_equals_teacher_forcing_on_the_gpu():
    var = tiny_var().to(CUDA).eval()
    labels = torch.tensor([0, 4, 5], device=CUDA)
    sampled = var.generate_tokens(labels, cfg=0.0, seed=0)
    with torch.no_grad():
        teacher_logits = var(labels, var.tokenizer.tokens_to_var_input(sampled.tokens))
    for cached, forced in zip(sampled.logits, teacher_logits.split([p * p for p in PATCH_NUMS], dim=1)):
        torch.testing.assert_close(cached, forced, atol=1e-3, rtol=0)


def test_bf16_training_on_the_gpu_lowers_the_loss(tmp_path):
    config = TrainConfig(out=str(tmp_path), steps=30, batch_size=16, lr=2e-3, log_every=1, checkpoint_every=1000,
                         device="cuda", precision="bf16")
    train(tiny_task(), tiny_fashion(), config)
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL takes one GPU per rank: needs two GPUs")
def test_nccl_process_group_trains_and_stays_in_sync(tmp_path):
    result = tmp_path / "result.txt"
    completed = torchrun(TESTS / "train" / "ddp_worker.py", str(result), str(tmp_path / "run"), "cuda", timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)
    assert result.read_text().startswith("in sync nccl")
