"""Data loss: commands that write folders never delete or change what the user has.
`reference train`, `reference data` and `defend` refuse an output that is, contains or sits
inside an input, and --overwrite replaces only a folder the same command wrote before."""
from __future__ import annotations

import shutil

import pytest

from audit.cli import main


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def data_copy(small_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_data, d)
    return d


@pytest.mark.parametrize("where", ["same", "parent"])
def test_reference_train_never_deletes_its_dataset(data_copy, capsys, where):
    before = _snapshot(data_copy)
    out = data_copy if where == "same" else data_copy.parent
    argv = ["reference", "train", "--arch", "llava", "--preset", "tiny", "--variant", "grounded", "--data",
            str(data_copy), "--out", str(out), "--overwrite"]
    assert main(argv) == 2
    assert "--data folder" in _err(capsys)
    assert _snapshot(data_copy) == before


def test_overwrite_keeps_folders_mmaudit_did_not_write(tmp_path, data_copy, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["reference", "data", "--out", str(mine), "--n", "20", "--overwrite"]) == 2
    assert "is kept" in _err(capsys)
    assert main(["reference", "train", "--arch", "llava", "--preset", "tiny", "--variant", "grounded", "--data",
                 str(data_copy), "--out", str(mine), "--overwrite"]) == 2
    assert "is kept" in _err(capsys)
    assert (mine / "notes.txt").read_text() == "keep me"
    # a dataset written by mmaudit is replaced on request
    made = tmp_path / "made"
    assert main(["reference", "data", "--out", str(made), "--n", "20"]) == 0
    assert main(["reference", "data", "--out", str(made), "--n", "30", "--overwrite"]) == 0


@pytest.mark.parametrize("defense", [["dp", "--target-epsilon", "1"], ["debias", "--method", "cda"]])
def test_defend_refuses_outputs_over_its_inputs(untrained_llava, data_copy, tmp_path, capsys, defense):
    before = _snapshot(data_copy)
    base = ["defend", defense[0], *defense[1:], "--model", str(untrained_llava), "--data", str(data_copy)]
    assert main([*base, "--out", str(data_copy / "defended")]) == 2
    assert "--data folder" in _err(capsys)
    assert _snapshot(data_copy) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    assert main([*base, "--out", str(foreign), "--overwrite"]) == 2
    assert "is kept" in _err(capsys)
    assert (foreign / "thesis.tex").exists()
