"""Run the example script and the notebook at a tiny scale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_example_script_runs(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pretrain_finetune.py"),
            "--epochs",
            "2",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "balanced accuracy" in completed.stdout.lower()
    assert (tmp_path / "pretrain" / "last.ckpt").is_file()


@pytest.mark.slow
def test_demo_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMCLR_NOTEBOOK_EPOCHS", "2")
    monkeypatch.setenv("SIMCLR_NOTEBOOK_IMAGE_SIZE", "16")
    monkeypatch.setenv("SIMCLR_NOTEBOOK_OUTPUT", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook = nbformat.read(ROOT / "notebooks" / "demo.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    assert any("SimCLR + linear probe" in text for text in outputs)
    assert list((tmp_path / "runs").glob("simclr-lightning/*/checkpoints/last.ckpt"))
