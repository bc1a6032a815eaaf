"""Researchers' tools: `scalegen reconstruct` (pairs grid, PSNR, rFID), `scalegen plot` (curves of any runs), and the
ETA in a run's progress.log."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.eval.reconstruction import reconstruction_report, save_pairs_grid
from scalegen.train.curves import images_per_step, read_curves
from test_tokenizer_training import tokenizer_run
from test_var_training import tokenizer_folder
from tests_support import save_tiny_vae, user_error

TINY_SIDE = 8  # the tiny tokenizer's image size


@pytest.mark.end_to_end
def test_reconstruct_writes_pairs_and_scores_them(tmp_path, capsys):
    tokenizer_folder(tmp_path / "vq")
    grid = tmp_path / "pairs.png"
    main(["reconstruct", "--tokenizer", str(tmp_path / "vq"), "--data", "fashion-mnist", "--out", str(grid),
          "--count", "64", "--features", "fmnist", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 64 and math.isfinite(report["fid"]) and report["fid"] > 0
    assert 0 < report["psnr"] < 100
    assert Image.open(grid).size == (2 * 8 * TINY_SIDE, 8 * TINY_SIDE)  # 8 pairs a row, 8 rows


@pytest.mark.end_to_end
def test_reconstruct_through_a_local_sd_vae(tmp_path, capsys):
    pytest.importorskip("diffusers")
    vae = save_tiny_vae(tmp_path / "vae")
    grid = tmp_path / "pairs.png"
    with pytest.raises(SystemExit):  # diffusers may warn on stderr before the error line
        main(["reconstruct", "--tokenizer", str(vae), "--out", str(grid)])
    assert "--image-size" in capsys.readouterr().err.strip().splitlines()[-1]
    main(["reconstruct", "--tokenizer", str(vae), "--image-size", "16", "--count", "3", "--out", str(grid),
          "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["num_images"] == 3
    assert Image.open(grid).size == (6 * 16, 16)  # fewer than a row of pairs: one row


def test_a_perfect_reconstruction_scores_better_than_noise():
    torch.manual_seed(0)
    originals = torch.rand(64, 1, 32, 32)
    perfect = reconstruction_report(originals, originals.clone(), "fmnist")
    noise = reconstruction_report(originals, torch.rand_like(originals), "fmnist")
    assert perfect["psnr"] == 100 and abs(perfect["fid"]) < 1e-3 < noise["fid"]


def test_pairs_never_break_across_rows(tmp_path):
    originals, reconstructions = torch.ones(9, 1, 2, 2), torch.full((9, 1, 2, 2), 0.5)
    pixels = np.asarray(Image.open(save_pairs_grid(originals, reconstructions, tmp_path / "g.png")))
    pixels = pixels[::2, ::2]  # one pixel per cell: 2 rows of 8 pairs
    assert pixels[0].tolist() == [255, 128] * 8
    assert pixels[1].tolist() == [255, 128] + [0] * 14  # the ninth pair, then blank cells


def test_reconstruct_rejects_bad_input_in_one_line(tmp_path, capsys):
    message = user_error(["reconstruct", "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")],
                         capsys)
    assert "not found" in message
    tokenizer_folder(tmp_path / "vq")
    message = user_error(["reconstruct", "--tokenizer", str(tmp_path / "vq"), "--out", str(tmp_path / "g.txt")], capsys)
    assert ".png" in message


def write_log(run: Path, header: str, *rows: str) -> Path:
    run.mkdir(parents=True)
    (run / "log.csv").write_text("\n".join([header, *rows]) + "\n")
    return run


@pytest.mark.end_to_end
def test_plot_draws_any_runs_and_names_the_figures_they_log(tmp_path, capsys):
    first = write_log(tmp_path / "small", "step,loss,mse", "1,1.0,0.5", "2,0.8,0.4", "2,0.7,0.35", "3,0.6,0.3")
    second = write_log(tmp_path / "large", "step,loss,accuracy", "1,0.9,0.1", "2,0.5,0.3")
    assert read_curves(first)["loss"].tolist() == [1.0, 0.7, 0.6]  # a step logged twice keeps its last row
    out = tmp_path / "curves.png"
    main(["plot", str(first), str(second), "--out", str(out), "--metric", "loss,mse,accuracy", "--log-y"])
    assert Image.open(out).size[0] > Image.open(out).size[1]  # two panels a row, two rows
    main(["plot", str(first), str(second), "--by", "run", "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").stat().st_size > 0
    message = user_error(["plot", str(first), str(second), "--out", str(out), "--metric", "fid"], capsys)
    assert "fid" in message and "accuracy, loss, mse" in message
    message = user_error(["plot", str(first), str(tmp_path), "--out", str(out)], capsys)
    assert "log.csv" in message
    message = user_error(["plot", str(first), "--x", "images", "--out", str(out)], capsys)
    assert "--x step" in message


@pytest.mark.end_to_end
def test_a_run_without_a_terminal_logs_its_eta_and_plots_against_images(tmp_path, capsys):
    tokenizer_run(tmp_path / "run", 2)
    lines = (tmp_path / "run" / "progress.log").read_text().splitlines()
    assert len(lines) == 2 and all(re.search(r" eta \d+:\d\d:\d\d$", line) for line in lines)
    assert lines[-1].endswith(" eta 0:00:00")
    assert images_per_step(tmp_path / "run") == 16
    main(["plot", str(tmp_path / "run"), "--x", "images", "--metric", "l1,l2", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").exists()
