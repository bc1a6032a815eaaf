"""FID while training (`--eval-every`): scored into RUN/eval.csv without changing what is trained, and refused where
it cannot score."""
import math

import pytest
from torch import nn

from scalegen.cli.main import main
from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.train.evaluation import Evaluator
from scalegen.train.task import TrainingTask
from scalegen.train.run_log import read_log
from tests_support import training_error, write_image_folder

TINY_FASHION_DIT = ["train", "dit", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                    "--patch-size", "8", "--image-size", "32", "--steps", "4", "--batch-size", "8", "--max-images", "64",
                    "--sample-steps", "2", "--log-every", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.mark.end_to_end
def test_evaluations_are_logged_and_leave_training_unchanged(tmp_path):
    main([*TINY_FASHION_DIT, "--eval-every", "2", "--eval-samples", "20", "--out", str(tmp_path / "evaluated")])
    main([*TINY_FASHION_DIT, "--out", str(tmp_path / "plain")])
    evaluations = read_log(tmp_path / "evaluated", evaluations=True)
    assert [row["step"] for row in evaluations] == [2, 4]
    for row in evaluations:
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["accuracy"] <= 1 and row["seconds"] > 0
    losses = [row["loss"] for row in read_log(tmp_path / "evaluated")]
    assert losses == [row["loss"] for row in read_log(tmp_path / "plain")]  # the training RNG was put back
    assert not list((tmp_path / "evaluated" / "eval").glob("*.npz"))  # the scored samples are not kept


def test_evaluation_is_refused_where_nothing_can_score_it(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", size=8)
    message = training_error(["train", "dit", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
                              "--num-heads", "2", "--patch-size", "4", "--image-size", "8", "--data", str(folder),
                              "--steps", "1", "--batch-size", "4", "--device", "cpu", "--eval-every", "1",
                              "--out", str(tmp_path / "run")], capsys)
    assert "--eval-inception" in message and "--eval-reference" in message


class Reconstructing(TrainingTask):
    kind = "reconstructing"  # a task whose model draws no samples (as a tokenizer's)


def test_evaluation_is_refused_for_a_model_that_generates_nothing(tmp_path):
    with pytest.raises(UserError, match="generates none"):
        Evaluator(Reconstructing(nn.Linear(1, 1)), 16, tmp_path, DistributedContext())
