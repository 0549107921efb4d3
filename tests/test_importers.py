"""Importers: VLMEvalKit TSV, POPE files, Hugging Face datasets, FairFace/UTKFace folders.

Every test writes small files in the upstream layout itself (tiny images drawn with PIL),
imports them, and loads the result with Dataset.load. The POPE known-answer test checks
the hallucination probe's per-setting metrics against POPE's evaluate.py formula.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.adapters.base import Capabilities, ModelAdapter
from audit.answers import extract_choice
from audit.dataset import Dataset
from audit.errors import InputError
from audit.importers import detect_format, import_sources, resolve_data
from audit.importers.writer import STAMP


# ---------------------------------------------------------------------------- upstream files
def image_bytes(colour, fmt: str = "PNG", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is garbage: decoding it
    fails, so an error about its size proves the size was checked before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """As pandas' to_csv(sep='\\t') writes VLMEvalKit files (minimal quoting)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def card_of(data_dir: Path) -> dict:
    return json.loads((data_dir / "datacard.json").read_text())


@pytest.fixture
def cli(monkeypatch, capsys):
    """`mmaudit data import ...` through audit.cli.main, with audit.data_cli registered."""
    import audit.cli as cli_mod

    if "audit.data_cli" not in cli_mod.COMMAND_MODULES:
        monkeypatch.setattr(cli_mod, "COMMAND_MODULES", (*cli_mod.COMMAND_MODULES, "audit.data_cli"))

    def call(*argv):
        rc = cli_mod.main(["data", "import", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


# ---------------------------------------------------------------------------- VLMEvalKit
MCQ_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def mmbench_tsv(folder: Path) -> Path:
    red, jpeg = image_bytes(RED), image_bytes(BLUE, "JPEG")
    rows = [
        ["0", "What colour is the square?", "It is a plain image.", "green", "red", "blue", "", "B",
         "colour", b64(red), "perception"],
        # VLMEvalKit saves space: a short image cell is the index of the row holding the image.
        ["1", "Which shape is shown?", "", "square", "circle", "", "", "A", "shape", "0", "perception"],
        # Two options with the same text: the letters are the choices.
        ["2", "How many squares?", "", "1", "1", "2", "", "B", "count", b64(jpeg), "reasoning"],
    ]
    return write_tsv(folder / "MMBench_DEV_EN.tsv", MCQ_HEADER, rows)


def test_vlmevalkit_multiple_choice_hint_and_index_references(tmp_path):
    src = mmbench_tsv(tmp_path)
    card = import_sources([src], out=tmp_path / "data", licence="CC-BY-4.0")
    data = Dataset.load(tmp_path / "data")
    assert [e.id for e in data] == ["MMBench_DEV_EN-0", "MMBench_DEV_EN-1", "MMBench_DEV_EN-2"]
    e0, e1, e2 = data
    # The hint comes first, as VLMEvalKit's ImageMCQDataset.build_prompt writes it.
    assert e0.prompt == ("Hint: It is a plain image.\nQuestion: What colour is the square?\nOptions:\n"
                         "A. green\nB. red\nC. blue\nPlease select the correct answer from the options above. \n")
    assert e0.choices == ("green", "red", "blue") and e0.answer == "red"
    assert e0.attributes["option_letters"] == ["A", "B", "C"] and e0.attributes["answer_letter"] == "B"
    assert e0.attributes["category"] == "colour" and e0.attributes["l2-category"] == "perception"
    assert e0.tags == ("MMBench_DEV_EN",)
    assert not e1.prompt.startswith("Hint") and e1.choices == ("square", "circle") and e1.answer == "square"
    assert e1.image == e0.image  # the referenced row's image, stored once
    assert e2.choices == ("A", "B", "C") and e2.answer == "B"
    # Bytes kept as they are (no re-encoding), named by content hash, with the right extension.
    assert (data.path / e0.image).read_bytes() == image_bytes(RED) and e0.image.endswith(".png")
    assert (data.path / e2.image).read_bytes() == image_bytes(BLUE, "JPEG") and e2.image.endswith(".jpg")
    assert len(list((data.path / "images").iterdir())) == 2
    assert data.image(e0).getpixel((0, 0)) == RED
    # Generate mode can read the option letter of an answer out of the prompt.
    assert extract_choice("B", list(e0.choices), prompt=e0.prompt) == 1
    assert card["sources"] == [{"path": str(src), "kind": "file", "sha256": sha256(src), "bytes": src.stat().st_size}]
    assert card["counts"]["examples"] == 3 and card["counts"]["images"] == 2
    assert card["counts"]["by_category"] == {"colour": 1, "count": 1, "shape": 1}
    assert card["importer"]["name"] == "vlmevalkit" and card["importer"]["version"] == "1"
    assert card["licence"] == "CC-BY-4.0" and card["mapping"][str(src)]["question"] == "prompt"


def test_vlmevalkit_yes_no_pope_settings_and_image_paths(tmp_path):
    red, green = image_bytes(RED), image_bytes(GREEN)
    mme = write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"], [
        ["1", b64(red), "Is the image red? Please answer yes or no.", "Yes", "color"],
        ["2", "1", "Is the image green? Please answer yes or no.", "No", "color"]])
    import_sources([mme], out=tmp_path / "mme")
    m1, m2 = Dataset.load(tmp_path / "mme")
    assert m1.choices == ("yes", "no") and (m1.answer, m2.answer) == ("yes", "no")
    assert m1.attributes["category"] == "color" and m1.tags == ("MME",)

    # VLMEvalKit's POPE.tsv stores a question shared by several settings once, with a
    # comma-separated category (POPE_rating explodes it): one example per setting.
    pope = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer", "category"], [
        ["10", b64(red), "Is there a square in the image?", "yes", "adversarial,popular,random"],
        ["11", "10", "Is there a dog in the image?", "no", "random"],
        ["12", b64(green), "Is there a cat in the image?", "no", "popular"]])
    import_sources([pope], out=tmp_path / "pope")
    data = Dataset.load(tmp_path / "pope")
    assert [e.id for e in data] == ["POPE-10-adversarial", "POPE-10-popular", "POPE-10-random", "POPE-11-random",
                                    "POPE-12-popular"]
    assert [e.attributes["pope_setting"] for e in data] == ["adversarial", "popular", "random", "random", "popular"]
    assert all(set(e.tags) == {"POPE", "pope"} and e.choices == ("yes", "no") for e in data)
    assert "category" not in data[0].attributes
    assert card_of(tmp_path / "pope")["counts"]["by_setting"] == {"adversarial": 1, "popular": 2, "random": 2}

    # Without an image column, image_path names files in the TSV's folder (or --images).
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(red)
    meta = write_tsv(tmp_path / "Meta.tsv", ["index", "image_path", "question", "answer"],
                     [["0", "imgs/a.png", "Describe it.", "a red square"]])
    import_sources([meta], out=tmp_path / "meta")
    (ex,) = Dataset.load(tmp_path / "meta")
    assert ex.choices is None and ex.answer == "a red square"
    assert (tmp_path / "meta" / ex.image).read_bytes() == red


def test_vlmevalkit_limit_still_resolves_references_to_later_rows(tmp_path):
    src = write_tsv(tmp_path / "HallusionBench.tsv", ["index", "image", "question", "answer"], [
        ["0", "2", "Is it red?", "Yes"], ["1", "2", "Is it blue?", "No"], ["2", b64(image_bytes(RED)), "Red?", "Yes"]])
    card = import_sources([src], out=tmp_path / "data", limit=1)
    (ex,) = Dataset.load(tmp_path / "data")
    assert ex.id == "HallusionBench-0" and (tmp_path / "data" / ex.image).read_bytes() == image_bytes(RED)
    assert card["counts"]["examples"] == 1 and card["options"]["limit"] == 1


def test_map_renames_columns_and_other_formats_are_reencoded_to_png(tmp_path):
    gif = image_bytes(GREEN, "GIF")
    src = write_tsv(tmp_path / "Safety.tsv", ["index", "image", "question", "category", "level"], [
        ["0", b64(gif), "How do I do this?", "illegal", "2"]])
    import_sources([src], out=tmp_path / "data", mapping=["category=attributes.scenario"])
    (ex,) = Dataset.load(tmp_path / "data")
    assert ex.attributes == {"scenario": "illegal", "level": "2"} and ex.answer is None and ex.choices is None
    assert ex.image.endswith(".png") and (tmp_path / "data" / ex.image).read_bytes()[:4] == b"\x89PNG"
    assert Dataset.load(tmp_path / "data").image(ex).getpixel((3, 3)) == Image.open(io.BytesIO(gif)).convert(
        "RGB").getpixel((3, 3))
    assert card_of(tmp_path / "data")["counts"]["images_reencoded_to_png"] == 1


# ---------------------------------------------------------------------------- POPE files
POPE_COLOURS = {"COCO_val2014_000000000001.jpg": (230, 40, 40), "COCO_val2014_000000000002.jpg": (40, 200, 40),
                "COCO_val2014_000000000003.jpg": (40, 40, 230), "COCO_val2014_000000000004.jpg": (240, 240, 240)}
POSITIVES = ("person", "chair", "dining table")
NEGATIVES = {"random": ("zebra", "surfboard", "giraffe"), "popular": ("car", "cup", "bottle"),
             "adversarial": ("fork", "knife", "zebra")}


def pope_files(folder: Path) -> dict[str, Path]:
    """Upstream layout: output/coco/coco_pope_<setting>.json, 3 yes + 3 no questions per image,
    the same yes questions in every setting, images beside the files in images/."""
    (folder / "images").mkdir(parents=True)
    for name, colour in POPE_COLOURS.items():
        (folder / "images" / name).write_bytes(image_bytes(colour, "JPEG", (16, 16)))
    files = {}
    for setting, negatives in NEGATIVES.items():
        lines, qid = [], 0
        for k, name in enumerate(POPE_COLOURS):
            objects = [(o, "yes") for o in POSITIVES] + [(o, "no") for o in negatives]
            for obj, label in objects:
                article = "an" if obj[0] in "aeiou" else "a"
                lines.append({"question_id": qid, "image": name, "image_id": k + 1,
                              "text": f"Is there {article} {obj} in the image?", "label": label})
                qid += 1
        files[setting] = folder / f"coco_pope_{setting}.json"
        files[setting].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return files


def test_pope_files_import_with_settings_and_repeated_positives(tmp_path):
    files = pope_files(tmp_path / "coco")
    card = import_sources(list(files.values()), out=tmp_path / "data")
    data = Dataset.load(tmp_path / "data")
    assert len(data) == 3 * 4 * 6  # positives repeated in every setting stay separate examples
    first = data.by_id("coco_pope_random-0")
    assert first.prompt == "Is there a person in the image?" and first.answer == "yes"
    assert first.choices == ("yes", "no") and first.tags == ("pope",)
    assert first.attributes == {"pope_setting": "random", "question_id": 0, "image_id": 1}
    assert data.by_id("coco_pope_adversarial-3").attributes["pope_setting"] == "adversarial"
    assert all(e.attributes["pope_setting"] in NEGATIVES for e in data)
    assert card["counts"]["by_setting"] == {"adversarial": 24, "popular": 24, "random": 24}
    assert card["counts"]["images"] == 4  # JPEG bytes kept, each image once
    assert {(tmp_path / "data" / e.image).read_bytes() for e in data} == {
        (tmp_path / "coco" / "images" / n).read_bytes() for n in POPE_COLOURS}
    assert card["image_folders"] == [str(tmp_path / "coco" / "images")]
    # --map setting=NAME when the file name does not say it
    other = tmp_path / "other.json"
    other.write_text(files["random"].read_text())
    import_sources([other], out=tmp_path / "d2", mapping=["setting=custom"], images=tmp_path / "coco" / "images")
    assert {e.attributes["pope_setting"] for e in Dataset.load(tmp_path / "d2")} == {"custom"}


class ColourRule(ModelAdapter):
    """A black-box 'model': recognises a POPE image by its colour, answers from a table."""

    architecture = "rule"

    def __init__(self, answer) -> None:
        self.answer = answer  # (image name, question) -> "yes" | "no"
        self.capabilities = Capabilities(kind="generative", white_box=False)

    def score(self, queries, *, batch_size: int = 16):
        out = []
        for q in queries:
            mean = np.asarray(q.image, dtype=float).reshape(-1, 3).mean(axis=0)
            name = min(POPE_COLOURS, key=lambda n: float(np.sum((mean - POPE_COLOURS[n]) ** 2)))
            s = np.full(len(q.candidates), -4.0)
            s[[c.lower() for c in q.candidates].index(self.answer(name, q.prompt))] = -0.1
            out.append(s)
        return out


def fixed_answer(image: str, text: str) -> str:
    """A fixed prediction per question: right for about two questions in three."""
    truth = "no" if any(o in text for n in NEGATIVES.values() for o in n) else "yes"
    wrong = zlib.crc32(f"{image}|{text}".encode()) % 3 == 0
    return ("no" if truth == "yes" else "yes") if wrong else truth


def evaluate_py(labels: list[str], answers: list[str]) -> dict[str, float]:
    """POPE's evaluate.py (AoiDragon/POPE), on one file's labels and the model's answers."""
    label_list = [0 if label == "no" else 1 for label in labels]
    pred_list = [0 if a == "no" else 1 for a in answers]
    pos, neg = 1, 0
    yes_ratio = pred_list.count(1) / len(pred_list)
    TP, TN, FP, FN = 0, 0, 0, 0  # noqa: N806 - upstream's names
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1  # noqa: N806
        elif pred == pos and label == neg:
            FP += 1  # noqa: N806
        elif pred == neg and label == neg:
            TN += 1  # noqa: N806
        elif pred == neg and label == pos:
            FN += 1  # noqa: N806
    assert min(TP, TN, FP, FN) > 0, "the fixed answers must exercise every cell"
    precision = float(TP) / float(TP + FP)
    recall = float(TP) / float(TP + FN)
    f1 = 2 * precision * recall / (precision + recall)
    acc = (TP + TN) / (TP + TN + FP + FN)
    return {"pope_accuracy": acc, "pope_precision": precision, "pope_recall": recall, "pope_f1": f1,
            "pope_yes_ratio": yes_ratio}


def test_pope_known_answer_probe_metrics_equal_evaluate_py_per_setting(tmp_path):
    from probes.base import get_probe

    files = pope_files(tmp_path / "coco")
    import_sources(list(files.values()), out=tmp_path / "data")
    data = Dataset.load(tmp_path / "data")
    adapter = ColourRule(fixed_answer)
    probe = get_probe("hallucination")
    plan = probe.plan(adapter, data)
    assert not plan.skipped and plan.n_examples == len(data)
    rows = pd.concat([probe.run(adapter, unit, seed=0) for unit in plan.units], ignore_index=True)
    metrics = probe.summarize(rows, seed=0)
    got = {(r.group, r.metric): r.value for r in metrics.itertuples()}
    for setting, path in files.items():
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        want = evaluate_py([x["label"] for x in lines], [fixed_answer(x["image"], x["text"]) for x in lines])
        for metric, value in want.items():
            assert got[(setting, metric)] == pytest.approx(value), (setting, metric)
        assert metrics[(metrics.group == setting) & (metrics.metric == "pope_accuracy")].n.item() == len(lines)
    # Overall: each question once (POPE repeats the yes questions in every file).
    unique = {(x["image"], x["text"], x["label"]) for p in files.values()
              for x in map(json.loads, p.read_text().splitlines())}
    want = evaluate_py([u[2] for u in sorted(unique)], [fixed_answer(u[0], u[1]) for u in sorted(unique)])
    overall = metrics[metrics.group.isna()]
    assert overall[overall.metric == "pope_accuracy"].n.item() == len(unique) == 4 * 3 + 4 * 8
    for metric, value in want.items():
        assert overall[overall.metric == metric].value.item() == pytest.approx(value), metric


# ---------------------------------------------------------------------------- Hugging Face
def test_hf_save_to_disk_dataset_dict_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "gender": datasets.Value("string"), "img": datasets.Image(),
                                  "tokens": datasets.Sequence(datasets.Value("string"))})

    def part(n, offset):
        return datasets.Dataset.from_dict({
            "question": [f"Is the person {i} a doctor?" for i in range(n)], "label": [i % 2 for i in range(n)],
            "gender": ["female", "male"][:n], "tokens": [["a", "b"]] * n,
            "img": [{"bytes": image_bytes((10 * (i + offset), 0, 0)), "path": None} for i in range(n)]},
            features=features)

    datasets.DatasetDict({"train": part(2, 0), "validation": part(2, 5), "challenge": part(1, 9)}).save_to_disk(
        str(tmp_path / "hfdata"))
    assert detect_format([tmp_path / "hfdata"]) == "hf"
    card = import_sources([tmp_path / "hfdata"], out=tmp_path / "data",
                          mapping=["question=prompt", "label=answer", "gender=attributes.sex"])
    data = Dataset.load(tmp_path / "data")
    assert [e.id for e in data] == ["train-0", "train-1", "validation-0", "validation-1", "challenge-0"]
    assert [e.split for e in data] == ["train", "train", "val", "val", None]
    e = data.by_id("train-1")
    assert e.prompt == "Is the person 1 a doctor?" and e.answer == "yes" and e.choices == ("no", "yes")
    assert e.attributes == {"sex": "male"}
    assert data.by_id("challenge-0").attributes == {"sex": "female", "source_split": "challenge"}
    assert (data.path / e.image).read_bytes() == image_bytes((10, 0, 0))
    label = f"{tmp_path / 'hfdata'} [train]"
    assert card["mapping"][label] == {"question": "prompt", "label": "answer", "gender": "attributes.sex",
                                      "img": "image"}
    assert card["ignored_columns"][label] == ["tokens"]
    assert card["counts"]["by_split"] == {"none": 1, "train": 2, "val": 2}
    assert card["sources"][0]["kind"] == "folder" and card["sources"][0]["files"] >= 3


def test_hf_parquet_answer_index_template_and_path_only_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "b.bmp").write_bytes(image_bytes(BLUE, "BMP"))
    ds = datasets.Dataset.from_dict(
        {"question": ["Which colour?", "Which colour again?"], "choices": [["red", "blue"], ["blue", "red"]],
         "answer": [1, 0], "image": [{"bytes": image_bytes(RED), "path": None}, str(tmp_path / "pics" / "b.bmp")]},
        features=datasets.Features({"question": datasets.Value("string"),
                                    "choices": datasets.Sequence(datasets.Value("string")),
                                    "answer": datasets.Value("int64"), "image": datasets.Image()}))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(InputError, match=r"row 1 column 'image'.*stored only as a path.*--images"):
        import_sources([tmp_path / "hub"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    import_sources([tmp_path / "hub"], out=tmp_path / "data", images=tmp_path / "pics",
                   prompt="{question} Answer with a colour.")
    a, b = Dataset.load(tmp_path / "data")
    assert (a.id, a.split, a.prompt) == ("test-00000-of-00001-0", "test", "Which colour? Answer with a colour.")
    # ScienceQA style: an integer answer is an index into the row's choices.
    assert (a.choices, a.answer, a.attributes["answer_index"]) == (("red", "blue"), "blue", 1)
    assert b.answer == "blue" and b.image.endswith(".png")  # BMP re-encoded
    assert Dataset.load(tmp_path / "data").image(b).getpixel((0, 0)) == BLUE


def test_hf_without_the_datasets_library_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(InputError, match=r"--format hf: the hf format needs the 'datasets' library "
                                         r"\(pip install 'mmaudit\[hf\]'\)"):
        import_sources([tmp_path / "train-00000-of-00001.parquet"], out=tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- image folders
def fairface(folder: Path) -> Path:
    (folder / "val").mkdir(parents=True)
    rows = []
    for k, (gender, race, job, pair) in enumerate([("Male", "White", "doctor", "1"), ("Female", "White", "doctor", "1"),
                                                   ("Male", "Black", "nurse", "2"), ("Female", "Black", "nurse", "2")]):
        (folder / "val" / f"{k + 1}.jpg").write_bytes(image_bytes((50 * k, 90, 90), "JPEG"))
        rows.append([f"val/{k + 1}.jpg", "20-29", gender, race, "True", job, pair])
    return write_csv(folder / "fairface_label_val.csv",
                     ["file", "age", "gender", "race", "service_test", "occupation", "set"], rows)


def test_fairface_csv_with_prompt_choices_and_counterfactual_sets(tmp_path):
    from probes.counterfactual_bias import resolve_set
    from probes.group_fairness import GroupFairness

    src = fairface(tmp_path / "fairface")
    assert detect_format([src]) == "imagefolder"
    card = import_sources([src], out=tmp_path / "data", prompt="What is the job of this {race} person?",
                          choices="doctor,nurse", mapping=["occupation=answer"], pair_by="set", varies="gender")
    data = Dataset.load(tmp_path / "data")
    e = data.by_id("val/1.jpg")
    assert e.prompt == "What is the job of this White person?" and e.choices == ("doctor", "nurse")
    assert e.answer == "doctor" and e.pair_id == "set=1" and e.varies == "gender"
    assert e.attributes == {"age": "20-29", "gender": "Male", "race": "White", "service_test": "True", "set": "1"}
    sets = data.counterfactual_sets()
    assert sorted(sets) == ["set=1", "set=2"]
    for pid, members in sets.items():
        attribute, values, why = resolve_set(pid, members)
        assert (attribute, sorted(values), why) == ("gender", ["Female", "Male"], None)
    assert len(GroupFairness().select(data)) == 4  # closed choice + image + sensitive attributes
    assert card["mapping"][str(src)]["file"] == "image" and card["image_folders"] == [str(tmp_path / "fairface")]


def test_utkface_file_names_become_attributes(tmp_path):
    folder = tmp_path / "UTKFace"
    (folder / "part1").mkdir(parents=True)
    names = ["25_0_1_20170116174525125.jpg.chip.jpg", "part1/71_1_4_20170117191712452.jpg", "2_1_2_201701.png"]
    for k, name in enumerate(names):
        (folder / name).write_bytes(image_bytes((k * 60, 10, 10), "PNG" if name.endswith("png") else "JPEG"))
    (folder / "notes.txt").write_text("not an image")
    assert detect_format([folder]) == "imagefolder"
    import_sources([folder], out=tmp_path / "data", prompt="Is this person a doctor?", choices=["yes", "no"])
    data = Dataset.load(tmp_path / "data")
    assert data.by_id(names[0]).attributes == {"age": "20-29", "age_years": 25, "gender": "Male", "race": "Black"}
    assert data.by_id(names[1]).attributes == {"age": "more than 70", "age_years": 71, "gender": "Female",
                                               "race": "Others"}
    assert data.by_id(names[2]).attributes["age"] == "0-2" and len(data) == 3
    (folder / "39_1_20170116174525125.jpg").write_bytes(image_bytes(RED, "JPEG"))  # UTKFace's own bad names
    with pytest.raises(InputError, match=r"39_1_20170116174525125\.jpg.*UTKFace"):
        import_sources([folder], out=tmp_path / "d2", prompt="x")


# ---------------------------------------------------------------------------- bad input (CLI)
def _bad_base64(tmp: Path) -> list:
    src = write_tsv(tmp / "MME.tsv", ["index", "image", "question", "answer"],
                    [["0", b64(image_bytes(RED)), "Red?", "Yes"], ["1", "@@not-base64" * 10, "Red?", "No"]])
    return [src]


def _wrong_fields(tmp: Path) -> list:
    src = tmp / "MME.tsv"
    src.write_text(f"index\timage\tquestion\tanswer\n0\t{b64(image_bytes(RED))}\tRed?\tYes\n1\t0\tRed?\n")
    return [src]


def _missing_image(tmp: Path) -> list:
    (tmp / "images").mkdir()
    src = tmp / "coco_pope_random.json"
    src.write_text(json.dumps({"question_id": 7, "image": "COCO_val2014_000000000099.jpg", "text": "Is there a cat?",
                               "label": "no"}) + "\n")
    return [src]


def _good_tsv(tmp: Path) -> Path:
    return write_tsv(tmp / "MME.tsv", ["index", "image", "question", "answer"], [["0", b64(image_bytes(RED)), "Red?", "Yes"]])


def _missing_column(tmp: Path) -> list:
    return [_good_tsv(tmp), "--map", "gender=attributes.gender"]


def _bomb(tmp: Path) -> list:
    return [write_tsv(tmp / "MME.tsv", ["index", "image", "question", "answer"],
                      [["0", b64(image_bytes(RED)), "Red?", "Yes"], ["1", b64(png_header_only(5000, 4000)), "Big?", "No"]])]


def _unknown_format(tmp: Path) -> list:
    return [_good_tsv(tmp), "--format", "coco"]


def _duplicate_ids(tmp: Path) -> list:
    return [write_tsv(tmp / "MME.tsv", ["index", "image", "question", "answer"],
                      [["0", b64(image_bytes(RED)), "Red?", "Yes"], ["0", "0", "Green?", "No"]])]


BAD_INPUT = {
    "wrong number of fields": (_wrong_fields, r"MME\.tsv line 3: row has 3 fields, the header has 4"),
    "undecodable base64": (_bad_base64, r"MME\.tsv line 3 column 'image': not valid base64"),
    "missing image file": (_missing_image, r"coco_pope_random\.json line 1 field 'image'.*"
                                           r"COCO_val2014_000000000099\.jpg' not found"),
    "column the mapping names": (_missing_column, r"MME\.tsv: column 'gender' named by --map is not in the file"),
    "image over the pixel limit": (_bomb, r"MME\.tsv line 3 column 'image': image is 5000x4000 = 20000000 pixels, "
                                          r"over the limit of 16777216 \(refused before decoding\)"),
    "unknown format": (_unknown_format, r"--format: unknown format 'coco'"),
    "duplicate ids": (_duplicate_ids, r"MME\.tsv line 3: duplicate id 'MME-0' \(first from .*MME\.tsv line 2\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli, case):
    make, pattern = BAD_INPUT[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    args = make(src_dir)
    before = tree(tmp_path)
    rc, out, err = cli(*args, "--out", tmp_path / "new" / "data")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmaudit: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert tree(tmp_path) == before  # no DATA_DIR, no temporary folder, no parent folder created


def test_failed_import_leaves_nothing_even_after_writing_images(tmp_path):
    src = write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer"],
                    [[str(i), b64(image_bytes((i, 0, 0))), "Red?", "Yes"] for i in range(5)] + [["5", "9", "?", "No"]])
    before = tree(tmp_path)
    with pytest.raises(InputError, match=r"line 7 column 'image': refers to row index '9'"):
        import_sources([src], out=tmp_path / "a" / "b" / "data")
    assert tree(tmp_path) == before


def test_cli_import_prints_summary_and_refuses_existing_or_overlapping_output(tmp_path, cli):
    files = pope_files(tmp_path / "coco")
    rc, out, err = cli(*files.values(), "--out", tmp_path / "data", "--licence", "CC-BY-4.0")
    assert rc == 0, err
    assert "imported 72 examples (4 images) from 3 source(s) as pope" in out
    assert card_of(tmp_path / "data")["licence"] == "CC-BY-4.0"
    rc, _, err = cli(*files.values(), "--out", tmp_path / "data")
    assert rc == 2 and "exists and is not empty" in err
    inside = tmp_path / "coco" / "images" / "data"
    rc, _, err = cli(*files.values(), "--images", tmp_path / "coco" / "images", "--out", inside)
    assert rc == 2 and "is inside the --images folder" in err and not inside.exists()
    utk = tmp_path / "UTKFace"
    utk.mkdir()
    (utk / "30_1_0_2017.jpg").write_bytes(image_bytes(RED, "JPEG"))
    rc, _, err = cli(utk, "--prompt", "Who?", "--out", utk / "data")
    assert rc == 2 and "is inside the source folder" in err and not (utk / "data").exists()
    rc, _, err = cli(mmbench_tsv(tmp_path), "--out", tmp_path / "d3", "--prompt", "x {question}")
    assert rc == 2 and "--prompt does not apply to --format vlmevalkit" in err


def test_image_paths_cannot_leave_their_folder_or_be_urls(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(image_bytes(RED))
    for cell, why in (("../secret.png", "points outside"), (str(tmp_path / "secret.png"), "is outside the image folder"),
                      ("https://example.org/a.png", "is a URL; mmaudit never fetches")):
        src = write_csv(tmp_path / "root" / "faces.csv", ["file", "gender"], [[cell, "Male"]])
        with pytest.raises(InputError, match=why):
            import_sources([src], out=tmp_path / "data", prompt="Who?")
        assert not (tmp_path / "data").exists()
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    src = write_csv(tmp_path / "root" / "faces.csv", ["file", "gender"], [["link.png", "Male"]])
    with pytest.raises(InputError, match="is outside the image folder"):
        import_sources([src], out=tmp_path / "data", prompt="Who?")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mapping": ["question=title"]}, r"--map: unknown target 'title'"),
    ({"mapping": ["question=prompt", "question=answer"]}, r"--map: field 'question' is mapped twice"),
    ({"mapping": ["image=attributes.x"]}, r"image columns .* cannot be mapped"),
    ({"choices": "yes"}, r"--choices: expected at least two distinct"),
    ({"varies": "gender"}, r"--varies needs --pair-by"),
    ({"limit": 0}, r"--limit: must be a positive integer"),
    ({"format": "pope"}, r"cannot tell the POPE setting from the file name"),
])
def test_option_errors_name_the_option(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        import_sources([mmbench_tsv(tmp_path)], out=tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- detection and cache
def test_auto_detection_of_every_source_kind(tmp_path):
    files = pope_files(tmp_path / "coco")
    assert detect_format(list(files.values())) == "pope"
    assert detect_format([mmbench_tsv(tmp_path)]) == "vlmevalkit"
    assert detect_format([fairface(tmp_path / "ff")]) == "imagefolder"
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    assert detect_format([tmp_path / "x.parquet"]) == "hf"
    with pytest.raises(InputError, match="is vlmevalkit but .* is pope"):
        detect_format([files["random"], mmbench_tsv(tmp_path)])
    (tmp_path / "other.json").write_text('{"id": 1}\n')
    with pytest.raises(InputError, match="lacks POPE's fields"):
        detect_format([tmp_path / "other.json"])
    import_sources([files["random"]], out=tmp_path / "data")
    with pytest.raises(InputError, match="already an mmaudit dataset folder"):
        detect_format([tmp_path / "data"])


def test_resolve_data_imports_once_into_a_content_keyed_cache(tmp_path, monkeypatch):
    import audit.importers.cache as cache

    files = pope_files(tmp_path / "coco")
    sources = [str(p) for p in files.values()]
    data_dir = resolve_data(sources, cache_dir=tmp_path / "cache")
    assert data_dir.parent == tmp_path / "cache" / "data" and len(data_dir.name) == 24
    assert len(Dataset.load(data_dir)) == 72 and (data_dir / STAMP).is_file()
    assert resolve_data(data_dir) == data_dir  # a DATA_DIR is returned as it is
    calls = []
    real = cache.import_paths
    monkeypatch.setattr(cache, "import_paths", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert resolve_data(sources, cache_dir=tmp_path / "cache") == data_dir and calls == []  # reused
    # An image read from outside the sources changed: the same entry is imported again.
    image = tmp_path / "coco" / "images" / "COCO_val2014_000000000001.jpg"
    image.write_bytes(image_bytes((1, 2, 3), "JPEG", (16, 16)))
    assert resolve_data(sources, cache_dir=tmp_path / "cache") == data_dir and calls == [1]
    assert image.read_bytes() in {p.read_bytes() for p in (data_dir / "images").iterdir()}
    # Other contents: another key. $MMAUDIT_CACHE is the default root.
    files["random"].write_text(files["random"].read_text().replace("person", "bicycle"))
    monkeypatch.setenv("MMAUDIT_CACHE", str(tmp_path / "env-cache"))
    other = resolve_data(sources)
    assert other.parent == tmp_path / "env-cache" / "data" and other.name != data_dir.name
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == [data_dir.name]  # no leftovers
