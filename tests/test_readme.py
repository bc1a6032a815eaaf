"""The README's figures cannot drift from what produced them: the demo table is checked against
`docs/demo_report.json` (the `report.json` of the `make demo` run the README names), and the sampling settings each
row names against the shipped models' configs (their `sampling` section, what `sample` and `demo` use)."""
import json
import re
from pathlib import Path

import pytest

from scalegen.runs.names import SHIPPED_DIT, SHIPPED_MEANFLOW_DIT, SHIPPED_VAR
from scalegen.models.sampling_settings import SAMPLING_KEY

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DEMO_REPORT = ROOT / "docs" / "demo_report.json"
# The shipped model each row of the demo's report samples ("VAR fast" is the VAR with its speed-ups).
ROW_MODELS = {"DiT": SHIPPED_DIT, "DiT MeanFlow": SHIPPED_MEANFLOW_DIT, "VAR": SHIPPED_VAR, "VAR fast": SHIPPED_VAR}


def demo_table() -> tuple[str, dict[str, list[str]]]:
    """The README's demo table: its header line and its rows by model name (the first cell up to its " (")."""
    lines = README.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| model |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].split(" (")[0]] = cells
    return lines[start], rows


def recommended(folder: Path) -> dict:
    """A shipped model's recommended sampling settings, as its config stores them."""
    return json.loads((folder / "config.json").read_text())[SAMPLING_KEY]


def test_the_demo_table_shows_the_figures_of_its_report():
    report = json.loads(DEMO_REPORT.read_text())
    header, rows = demo_table()
    assert sorted(rows) == sorted(report)  # a row for every model the demo samples, no other
    baselines = {figures["fid_real_train_same_count"] for figures in report.values()}
    assert len(baselines) == 1 and f"real images: {baselines.pop():.1f})" in header
    for name, figures in report.items():
        cells = rows[name]
        assert cells[1:5] == [f"{figures['sampling_seconds']:.1f} s", f"{figures['gflops_per_image']:g}",
                              f"{figures['accuracy']:.2f}", f"{figures['fid']:.1f}"], name


@pytest.mark.parametrize("name", sorted(ROW_MODELS))
def test_each_demo_row_names_its_models_recommended_sampling_settings(name):
    settings = recommended(ROW_MODELS[name])
    description = demo_table()[1][name][0]
    assert f"cfg {settings['cfg']:g}" in description
    if "steps" in settings:  # a DiT
        steps = re.search(r"(\d+) (?:\w+ )?steps?\b", description)
        assert steps is not None and int(steps.group(1)) == settings["steps"], description


def test_the_readme_names_the_shipped_models_guidance_where_it_names_a_default():
    text = " ".join(README.read_text().split())
    dit, var = (recommended(folder)["cfg"] for folder in (SHIPPED_DIT, SHIPPED_VAR))
    assert f"{dit:g} for the shipped DiT, {var:g} for the VAR" in text
