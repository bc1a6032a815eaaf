"""Power-law fits recover known exponents; table and run-folder inputs; the plot is written."""
import json

import numpy as np
import pytest

from scalegen.cli.main import main
from scalegen.errors import UserError
from scalegen.eval.scaling import fit_power_law, read_runs, read_table, scaling_report
from scalegen.runs.loading import load_dit
from scalegen.train.run_log import read_log
from scalegen.train.task import parameter_count
from tests_support import write_fashion_subset


def test_fit_recovers_exact_power_law():
    x = np.array([0.3, 0.6, 1.0, 2.0])  # billions of parameters, as VAR's d16..d30
    y = (2.5 * x) ** -0.20  # VAR's reported law
    fit = fit_power_law(x, y)
    assert fit.a == pytest.approx(2.5, rel=1e-9) and fit.b == pytest.approx(-0.20, rel=1e-9)
    assert fit.pearson == pytest.approx(-1.0)


def test_fit_with_noise_is_close():
    generator = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e7, 12)
    y = (1.5e-5 * x) ** -0.16 * np.exp(generator.normal(0, 0.005, len(x)))
    fit = fit_power_law(x, y)
    assert fit.b == pytest.approx(-0.16, abs=0.01) and fit.pearson < -0.99


def test_fit_rejects_bad_points():
    with pytest.raises(UserError, match="positive"):
        fit_power_law(np.array([1.0, 2.0]), np.array([1.0, 0.0]))
    with pytest.raises(UserError, match="at least 2"):
        fit_power_law(np.array([1.0]), np.array([1.0]))


def test_table_and_plot(tmp_path):
    table = tmp_path / "runs.csv"
    rows = ["name,params,loss"] + [f"d{d},{n},{(2.5 * n) ** -0.2}" for d, n in ((16, 0.31), (20, 0.6), (24, 1.03))]
    table.write_text("\n".join(rows) + "\n")
    names, x, y = read_table(table, "params", "loss")
    assert names == ["d16", "d20", "d24"]
    report = scaling_report(names, x, y, "params", "loss", tmp_path / "fit.png")
    assert report["b"] == pytest.approx(-0.2) and (tmp_path / "fit.png").stat().st_size > 0
    json.dumps(report)
    with pytest.raises(UserError, match="gflops"):
        read_table(table, "gflops", "loss")


def test_run_folders_as_scalegen_train_writes_them(tmp_path, capsys):
    """`scaling --runs` reads the parameter count from each run's stored config and the loss from its log."""
    folders, sizes, data = [], [], write_fashion_subset(tmp_path)
    for hidden_size in (16, 32, 64):
        folder = tmp_path / f"w{hidden_size}"
        main(["train", "dit", "--model", "DiT-S/4", "--depth", "1", "--hidden-size", str(hidden_size), "--num-heads", "2",
              "--image-size", "8", "--data", str(data), "--steps", "2", "--batch-size", "8",
              "--log-every", "1", "--sample-steps", "2", "--device", "cpu", "--out", str(folder)])
        folders.append(folder)
        sizes.append(parameter_count(load_dit(folder)))
    names, x, y = read_runs(folders, "params", "loss")
    assert names == ["w16", "w32", "w64"] and list(x) == sizes and sizes[0] < sizes[1] < sizes[2]
    assert list(y) == [read_log(folder)[-1]["loss"] for folder in folders]
    capsys.readouterr()
    main(["scaling", "--runs", *map(str, folders), "--x", "params", "--y", "loss", "--out", str(tmp_path / "fit.png")])
    report = json.loads(capsys.readouterr().out)
    assert report["num_points"] == 3 and report["b"] == pytest.approx(fit_power_law(x, y).b, rel=1e-3)  # 4 digits
    with pytest.raises(UserError, match="fid"):
        read_runs(folders, "params", "fid")


def test_two_points_warn_and_the_report_shows_no_spurious_digits(tmp_path, capsys):
    """Two points always fit a line exactly (Pearson ±1): the report says so (JSON and stderr) and gives no r; the
    figures it gives carry 4 significant digits, r 4 decimals."""
    table = tmp_path / "runs.csv"
    table.write_text("params,loss\n1.0,2.0\n3.0,1.7\n")
    main(["scaling", "--table", str(table)])
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["pearson"] is None and "only 2 points" in report["warning"]
    assert printed.err.startswith("warning: only 2 points") and len(printed.err.strip().splitlines()) == 1
    assert report["b"] == float(f"{report['b']:.4g}") and report["a"] == float(f"{report['a']:.4g}")
    x = np.array([1.0, 2.0, 4.0, 8.0])
    y = (2.5 * x) ** -0.2 * np.array([1.0, 1.01, 0.99, 1.0])
    noisy = scaling_report(["a", "b", "c", "d"], x, y, "params", "loss")
    assert "warning" not in noisy and noisy["pearson"] == round(noisy["pearson"], 4) and -1 < noisy["pearson"] < -0.9
