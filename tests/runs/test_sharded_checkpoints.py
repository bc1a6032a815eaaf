"""Sharded, asynchronous checkpoints of FSDP runs: every rank writes its shards with torch.distributed.checkpoint while
training goes on, the folder appears whole or not at all, and it resumes at another world size (2 ranks → 1, 1 → 2)
and exports to the one-file format with equal weights. The 2-rank runs are launched once
(tests/runs/sharded_checkpoint_worker.py)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegen.cli.main import main
from scalegen.models.dit import DiT, DiTConfig
from scalegen.runs.export import export_weights
from scalegen.runs.folder import (
    MODEL_FILE, SHARDED_DIR, SHARDED_INDEX, STAGING_PREFIX, RunFolder, is_sharded, last_checkpoint,
)
from scalegen.runs.loading import load_dit
from scalegen.runs.weights import load_weights
from scalegen.train import sharding
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from test_fast_path import FSDP_TOLERANCE, dit_task, var_task
from tests_support import tiny_fashion, torchrun, without_progress_bars

TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
HALF_STEPS, STEPS = 2, 4  # the 2-rank runs stop at HALF_STEPS; the resumed ones go on to STEPS
FULL_WEIGHTS = "full_weights.safetensors"  # the worker's gathered weights of the FSDP run, "model." and "ema." keys
ONE_PROCESS_FIRST = ("one_then_fsdp", "one_then_ddp")  # runs this process starts, the 2-rank launch resumes


def train_settings() -> dict:
    """The loop settings every run here shares: batch 8 in 2 micro-batches, fp32 on the CPU, a loss row per step."""
    return dict(batch_size=8, grad_accumulation=2, lr=1e-2, log_every=1, checkpoint_every=100, device="cpu",
                precision="fp32")


def train_here(out: Path, steps: int, fsdp: bool = False) -> None:
    """Train (or resume) a run in this process alone: no process group, nothing sharded."""
    torch.manual_seed(0)
    config = TrainConfig(out=str(out), steps=steps, fsdp=fsdp, **train_settings())
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), config)


def launch(scenario: str, root: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the worker's scenario on 2 gloo ranks; returns the finished process and the path of its JSON result."""
    result = root / f"{scenario}.json"
    # the worker imports this file, which imports tests/train/test_fast_path.py: torchrun puts every wing on its path
    return torchrun(Path(__file__).parent / "sharded_checkpoint_worker.py", scenario, str(result), str(root),
                    timeout=600), result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """The worker's "runs" scenario: its run folders and what rank 0 saw."""
    root = tmp_path_factory.mktemp("sharded")
    for name in ONE_PROCESS_FIRST:
        train_here(root / name, HALF_STEPS)
    completed, result = launch("runs", root)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)[-4000:]
    return root, json.loads(result.read_text())


@pytest.mark.multiprocess
def test_each_rank_writes_its_shards_in_the_background(runs):
    root, seen = runs
    for name in ("fsdp_half", "fsdp_sync"):
        folder = last_checkpoint(root / name)
        assert folder.name == "step-0000002" and is_sharded(folder) and not (folder / MODEL_FILE).exists(), name
        assert sorted(path.name for path in (folder / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not list((root / name / "checkpoints").glob(f"{STAGING_PREFIX}*")), name
    assert [folder.name for folder in RunFolder(root / "fsdp_half").step_folders()] == ["step-0000002", "step-0000001"]
    # Each write went into a staging folder while its final folder did not exist and last.json named a complete one.
    assert [write["step"] for write in seen["writes"]] == [1, 2]
    for write in seen["writes"]:
        assert write["staging"].startswith(STAGING_PREFIX) and write["in_checkpoints"] and not write["final_exists"]
        assert write["pointed_complete"]
    assert seen["writes"][0]["pointed"] is None and seen["writes"][1]["pointed"] == "step-0000001"
    assert seen["writes"][0]["training_went_on"]  # step 2 was trained while step 1's shards were being written


@pytest.mark.multiprocess
def test_sharded_checkpoint_exports_to_one_file_with_equal_weights(runs, tmp_path):
    root, _ = runs
    full = load_file(root / FULL_WEIGHTS)
    for prefer_ema, prefix in ((True, "ema."), (False, "model.")):
        stored, weights = load_weights(root / "fsdp_half", prefer_ema=prefer_ema)
        gathered = {key.removeprefix(prefix): value for key, value in full.items() if key.startswith(prefix)}
        assert stored["kind"] == "dit" and sorted(weights) == sorted(gathered)
        assert all(torch.equal(weights[key], gathered[key]) for key in weights), prefix
        exported = export_weights(root / "fsdp_half", tmp_path / f"export-{prefix}", half=False, prefer_ema=prefer_ema)
        one_file = load_file(exported / MODEL_FILE)
        assert all(torch.equal(one_file[key], weights[key]) for key in weights) and sorted(one_file) == sorted(weights)
    main(["export", "--run", str(last_checkpoint(root / "fsdp_half")), "--out", str(tmp_path / "cli")])
    model = load_dit(tmp_path / "cli")
    exported = model.state_dict()  # fp16 on disk (the export's default), the model's fp32 once loaded
    assert all(torch.allclose(value, full[f"ema.{key}"], atol=1e-3) for key, value in exported.items())


@pytest.mark.multiprocess
def test_sharded_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 ranks → 1: the FSDP run's sharded step-2 checkpoint goes on exactly as the DDP run's one-file one does (a
    single process draws its noise from rank 0's restored stream, so both go on alike, not as 2 ranks would)."""
    root, _ = runs
    losses, weights = {}, {}
    for name in ("fsdp_half", "ddp_half"):
        shutil.copytree(root / name, tmp_path / name)
        train_here(tmp_path / name, STEPS, fsdp=True)  # a single process has nothing to shard
        losses[name] = [row["loss"] for row in read_log(tmp_path / name)]
        weights[name] = load_weights(tmp_path / name, prefer_ema=False)[1]
        assert (last_checkpoint(tmp_path / name) / MODEL_FILE).exists(), name  # a single process writes one file
    assert len(losses["fsdp_half"]) == STEPS
    assert max(abs(a - b) for a, b in zip(losses["fsdp_half"], losses["ddp_half"])) < FSDP_TOLERANCE
    assert max((weights["fsdp_half"][key] - weights["ddp_half"][key]).abs().max().item()
               for key in weights["ddp_half"]) < FSDP_TOLERANCE


@pytest.mark.multiprocess
def test_one_file_checkpoint_resumes_under_fsdp(runs):
    """1 → 2: a single process's one-file checkpoint resumed under FSDP trains as under DDP, and saves sharded."""
    root, seen = runs
    losses = seen["losses"]
    assert len(losses["one_then_fsdp"]) == STEPS
    assert max(abs(a - b) for a, b in zip(losses["one_then_fsdp"], losses["one_then_ddp"])) < FSDP_TOLERANCE
    assert is_sharded(last_checkpoint(root / "one_then_fsdp"))
    assert (last_checkpoint(root / "one_then_ddp") / MODEL_FILE).exists()


@pytest.mark.multiprocess
def test_killed_write_leaves_the_previous_checkpoint(tmp_path):
    completed, _ = launch("killed", tmp_path)
    assert completed.returncode != 0  # rank 0 was killed while writing its step-4 shards
    run = RunFolder(tmp_path / "killed")
    assert run.last_checkpoint().name == "step-0000002" and is_sharded(run.last_checkpoint())
    staging, = run.checkpoints.glob(f"{STAGING_PREFIX}*")  # the unfinished write, never renamed into place
    assert (staging / SHARDED_DIR / "__0_0.distcp").exists() and not (staging / SHARDED_DIR / SHARDED_INDEX).exists()
    assert [folder.name for folder in run.step_folders()] == ["step-0000002"]
    train_here(tmp_path / "killed", STEPS)  # the rerun cleans the leftovers and resumes from step 2
    assert not list(run.checkpoints.glob(f"{STAGING_PREFIX}*")) and run.last_checkpoint().name == "step-0000004"


@pytest.mark.parametrize("make_task", [dit_task, var_task], ids=["dit", "var"])
def test_sample_grids_are_drawn_from_a_parameter_free_skeleton(make_task):
    """What rank 0 keeps under FSDP holds no parameters; filled with the weights it samples as the model itself."""
    model = make_task().model.eval()
    skeleton = sharding.parameter_free_copy(model)
    assert all(parameter.is_meta for parameter in skeleton.parameters())
    filled = sharding.filled_copy(skeleton, model.state_dict(), torch.device("cpu"))
    assert all(parameter.is_meta for parameter in skeleton.parameters())  # the skeleton serves the next grid too
    kwargs = {"steps": 2} if isinstance(model, DiT) else {}
    assert torch.equal(filled.generate([0, 1], seed=0, **kwargs), model.generate([0, 1], seed=0, **kwargs))
