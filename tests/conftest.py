"""Test-wide settings: one intra-op thread, since the suite's tensors are tiny and CI has 2 cores."""
import torch

torch.set_num_threads(1)
