"""The VAR's default learning rate learns at the batch sizes this project trains at: the official rule
(lr = 1e-4 · batch / 256) at the official batches, and the official lr at its smallest batch (768) below them."""
import math

import pytest
import torch

from scalegen.files import json_config
from scalegen.models.var import VARConfig
from scalegen.tokenizers.vqvae import VQVAE
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, resolved_config, train
from scalegen.train.var_task import VARTask
from test_tokenizer_training import TINY_TOKENIZER
from test_var_training import TINY_VAR
from tests_support import tiny_fashion

STEPS = 60
# Cross-entropy below ln(vocab) (a uniform guess) after 60 steps at batch 16, averaged over the last 10 steps. The
# default lr (3e-4) reaches 0.3 below on this tiny VAR; the old 6.25e-6 stays within 0.01, 2.5e-5 (the square-root
# rule) within 0.03.
LEARNED = 0.1


def var_task() -> VARTask:
    torch.manual_seed(0)
    return VARTask(VARConfig(**TINY_VAR), VQVAE(TINY_TOKENIZER).eval(), {"model": json_config(TINY_TOKENIZER)})


@pytest.mark.parametrize("batch_size, lr", [(16, 3e-4), (256, 3e-4), (768, 3e-4), (1024, 4e-4)])
def test_the_default_lr_keeps_the_official_rule_at_official_batches_and_its_lr_below(batch_size, lr):
    # 3e-4 is the lr the official VAR-d16 trains with at batch 768; the rule's 6.25e-6 at batch 16 moves nothing.
    config = resolved_config(TrainConfig(out="unused", steps=100, batch_size=batch_size), var_task())
    assert config.lr == pytest.approx(lr)


@pytest.mark.end_to_end
def test_sixty_steps_at_batch_16_with_the_default_lr_lower_the_loss_below_a_uniform_guess(tmp_path):
    train(var_task(), tiny_fashion(8), TrainConfig(out=str(tmp_path), steps=STEPS, batch_size=16, log_every=1,
                                                  checkpoint_every=1000, device="cpu", precision="fp32"))
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert len(losses) == STEPS
    assert sum(losses[-10:]) / 10 < math.log(TINY_VAR["vocab_size"]) - LEARNED
