"""Command line: --help everywhere, one clear stderr line and exit code 2 on bad input,
nothing already written lost."""
from __future__ import annotations

import json
import shutil

import pytest

from audit.cli import main


@pytest.mark.parametrize("argv", [[], ["reference"], ["reference", "data"], ["reference", "train"], ["serve"],
                                  ["run"], ["runs"], ["demo"]])
def test_help_works(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: mmaudit" in capsys.readouterr().out


def _last_err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected a message on stderr"
    return err[-1]


@pytest.mark.parametrize("argv, needle", [
    (["reference", "data", "--out", "x", "--bias", "1.5"], "--bias"),
    (["reference", "data", "--out", "x", "--n", "0"], "--n"),
    (["reference", "train", "--arch", "gpt2", "--preset", "tiny", "--variant", "grounded", "--data", "d", "--out", "o"], "--arch"),
    (["reference", "train", "--arch", "llava", "--preset", "huge", "--variant", "grounded", "--data", "d", "--out", "o"], "--preset"),
    (["run", "--model", "m", "--data", "d", "--suite", "nope", "--out", "o"], "--suite"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in _last_err(capsys)


def test_data_refuses_existing_folder_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["reference", "data", "--out", str(out), "--n", "10"]) == 2
    assert str(out) in _last_err(capsys)
    assert (out / "mine.txt").read_text() == "keep"


def test_run_reports_broken_manifest_line(untrained_llava, small_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    lines[4] = "{not json"
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["run", "--model", str(untrained_llava), "--data", str(data), "--probes", "modality_ablation",
            "--out", str(tmp_path / "run"), "--store", str(tmp_path / "s.duckdb"), "--max-examples", "8"]
    assert main(argv) == 2
    err = _last_err(capsys)
    assert "manifest.jsonl line 5" in err and "not valid JSON" in err
    # --on-error skip reports the line and goes on
    assert main([*argv, "--on-error", "skip"]) == 0
    assert "line 5" in capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file()


def test_run_rejects_unknown_probe(untrained_llava, small_data, tmp_path, capsys):
    argv = ["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes", "modality_ablation,telepathy",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "telepathy" in _last_err(capsys)
    assert not (tmp_path / "run").exists()


def test_run_rejects_unsupported_architecture_and_pickles(small_data, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    argv = ["run", "--data", str(small_data), "--probes", "modality_ablation", "--out", str(tmp_path / "r")]
    assert main([*argv, "--model", str(bert)]) == 2
    assert "unsupported architecture 'bert'" in _last_err(capsys)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main([*argv, "--model", str(pickled)]) == 2
    assert "safetensors" in _last_err(capsys)
    assert main([*argv, "--model", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in _last_err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, "--model", str(empty)]) == 2
    assert "config.json" in _last_err(capsys)


def test_run_with_missing_processor(untrained_llava, small_data, tmp_path, capsys):
    model = tmp_path / "noproc"
    model.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (untrained_llava / f).exists():
            shutil.copy(untrained_llava / f, model / f)
    argv = ["run", "--model", str(model), "--data", str(small_data), "--probes", "modality_ablation",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "processor" in _last_err(capsys)


def test_config_file_and_flags_merge_with_flags_winning(untrained_llava, small_data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {untrained_llava}\ndata: {small_data}\nsuite: quick\nseed: 5\nbatch_size: 3\n"
                   f"max_examples: 8\nstore: {tmp_path / 's.duckdb'}\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--seed", "9", "--probes", "attention"]) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["seed"] == 9 and config["batch_size"] == 3 and config["max_examples"] == 8
    assert config["probes"] == ["attention"] and config["suite"] is None


def test_parent_records_lineage(untrained_llava, small_data, tmp_path, capsys):
    from audit.store import Store

    store = tmp_path / "s.duckdb"
    base = ["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes", "modality_ablation",
            "--store", str(store), "--max-examples", "4"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--parent", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["parent_run_id"] == a["run_id"]
    runs = Store(store).runs().set_index("run_id")
    assert runs.loc[b["run_id"], "parent_run_id"] == a["run_id"]
    assert main([*base, "--out", str(tmp_path / "c"), "--parent", str(tmp_path / "nowhere")]) == 2
    assert "--parent" in _last_err(capsys)


def test_duplicate_probes_run_once(untrained_llava, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes",
                 "modality_ablation,modality_ablation", "--out", str(out), "--store", str(tmp_path / "s.duckdb"),
                 "--max-examples", "4"]) == 0
    assert "more than once" in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["probes"] == ["modality_ablation"]
    assert len([m for m in s["metrics"] if m["metric"] == "image_reliance" and m["group"] is None]) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_manifest_is_an_error(untrained_llava, tmp_path, capsys, content):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text(content)
    assert main(["run", "--model", str(untrained_llava), "--data", str(data), "--suite", "quick", "--out",
                 str(tmp_path / "run")]) == 2
    assert "no examples" in _last_err(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv_tail, needle", [(["--seed", "-1"], "--seed"), (["--seed", str(2**40)], "--seed"),
                                               (["--batch-size", "0"], "--batch-size")])
def test_bad_numbers_exit_2(argv_tail, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", "m", "--data", "d", "--suite", "quick", "--out", "o", *argv_tail])
    assert exc.value.code == 2
    assert needle in _last_err(capsys)


@pytest.mark.parametrize("payload, needle", [(b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
                                             (b"- a\n- b\n", "mapping"), (b"seed: -3\n", "'seed'")])
def test_bad_config_files_exit_2(tmp_path, capsys, payload, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(payload)
    assert main(["run", "--config", str(cfg)]) == 2
    assert needle in _last_err(capsys)


def test_internal_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import audit.commands

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(audit.commands, "cmd_runs", broken)
    assert main(["runs"]) == 1
    err = _last_err(capsys)
    assert "internal error: ZeroDivisionError: boom" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "runs"])


def test_config_file_replaces_flags_and_names_bad_fields(untrained_llava, small_data, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {untrained_llava}\ndata: {small_data}\nprobes: [modality_ablation]\n"
                   f"out: {tmp_path / 'run'}\nstore: {tmp_path / 's.duckdb'}\nmax_examples: 8\n")
    assert main(["run", "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["max_examples"] == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {untrained_llava}\ndata: {small_data}\nsuite: quick\nout: x\nseed: many\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = _last_err(capsys)
    assert "bad.yaml" in err and "'seed'" in err
    bad.write_text("!!python/object/apply:os.system ['echo hacked']\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "YAML" in _last_err(capsys)


def test_runs_lists_stored_runs(untrained_llava, small_data, tmp_path, capsys):
    store = tmp_path / "s.duckdb"
    assert main(["runs", "--store", str(store)]) == 0
    assert "no runs" in capsys.readouterr().out
    assert main(["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes", "modality_ablation",
                 "--out", str(tmp_path / "run"), "--store", str(store), "--max-examples", "8"]) == 0
    run_id = json.loads((tmp_path / "run" / "summary.json").read_text())["run_id"]
    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    assert run_id in capsys.readouterr().out
