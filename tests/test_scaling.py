"""Power-law fits recover known exponents; table and run-folder inputs; the plot is written."""
import json

import numpy as np
import pytest

from scalegen.errors import UserError
from scalegen.scaling import fit_power_law, read_runs, read_table, scaling_report


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


def test_run_folders(tmp_path):
    folders = []
    for depth, params in ((4, 1e6), (8, 8e6), (12, 27e6)):
        folder = tmp_path / f"d{depth}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"depth": depth, "params": params}))
        loss = (3e-7 * params) ** -0.1
        (folder / "log.csv").write_text(f"step,loss\n1,9.0\n100,{loss}\n")
        folders.append(folder)
    names, x, y = read_runs(folders, "params", "loss")
    assert names == ["d4", "d8", "d12"] and list(x) == [1e6, 8e6, 27e6]
    assert fit_power_law(x, y).b == pytest.approx(-0.1)
    with pytest.raises(UserError, match="fid"):
        read_runs(folders, "params", "fid")
