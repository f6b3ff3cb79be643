"""notebooks/compare_runs.ipynb runs top to bottom (nbclient, the venv's python3 kernel) on the tracking DB of a real
2-job sweep (the one tests/test_sweeps.py makes) and shows both runs, their reward curves and the by-mix table."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_sweeps import run_grid_sweep_once

pytestmark = pytest.mark.slow  # executes the notebook over real runs

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "compare_runs.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    sweep = run_grid_sweep_once(tmp_path_factory)
    figures = tmp_path_factory.mktemp("figures")
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("MEDIX_TRACKING_URI", f"sqlite:///{sweep}/mlflow.db")
        env.setenv("MEDIX_EXPERIMENTS", "grid_sweep")
        env.setenv("MEDIX_FIGURES_DIR", str(figures))
        env.setenv("PYTHONPATH", str(REPO))
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook, figures, sweep


def outputs_of(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if kind in o.get("data", {})]


def test_notebook_runs_and_saves_every_figure(executed):
    notebook, figures, sweep = executed
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
    for name in ("reward_curves.png", "val_curves.png", "final_by_mix.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(outputs_of(notebook, "image/png")) == 3  # one inline figure per plot cell


def test_notebook_tables_show_both_runs_of_the_sweep(executed):
    import mlflow

    notebook, figures, sweep = executed
    mlflow.set_tracking_uri(f"sqlite:///{sweep}/mlflow.db")
    mixes = set(mlflow.search_runs(experiment_names=["grid_sweep"])["tags.reward_mix"])
    assert len(mixes) == 2
    tables = [o["data"]["text/plain"] for o in outputs_of(notebook, "text/plain") if "reward" in o["data"]["text/plain"]]
    runs_table, by_mix = tables[0], tables[-1]
    assert all(mix in runs_table for mix in mixes) and str(sweep / "multirun")[:20] in runs_table
    assert all(mix in by_mix for mix in mixes) and "val/reward/llm_judge/mean" in by_mix
