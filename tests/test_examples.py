"""The example notebooks under docs/examples run from top to bottom in a fresh kernel and show what they promise."""
import re
from pathlib import Path

import pytest

from dlscale.distributed import local_rank_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
NOTEBOOK = EXAMPLES / "encoder_embeddings.ipynb"


def outputs(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


def test_the_notebooks_are_stored_without_outputs():
    """Outputs belong to a run, not to the repository: a stored output would go stale with the code."""
    for path in EXAMPLES.glob("*.ipynb"):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code and not any(c.outputs or c.execution_count for c in code), f"{path.name} holds outputs"


@pytest.mark.slow
def test_encoder_embeddings_notebook_embeds_probes_and_plots(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel starts as a user's would: without this test process's rank layout (an earlier test's in-process
    # run leaves MASTER_PORT set and its store bound to that port).
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute(env=local_rank_env())
    code = [c for c in notebook.cells if c.cell_type == "code"]
    text = "\n".join(outputs(c) for c in code)
    assert "embeddings of shape (180, " in text
    accuracy, chance = map(float, re.search(r"linear probe accuracy: ([0-9.]+) .*chance ([0-9.]+)", text).groups())
    assert chance == pytest.approx(1 / 3, abs=1e-3)
    assert accuracy > 0.6, f"the probe on the trained encoder's embeddings is near chance: {accuracy}"
    figures = [o for o in code[-1].outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 1, "the last cell shows the PCA figure"
    work = tmp_path / "encoder_embeddings_work"
    assert (work / "embeddings_pca.png").stat().st_size > 10_000
    assert len(list((work / "images").glob("*/*.npy"))) == 180
