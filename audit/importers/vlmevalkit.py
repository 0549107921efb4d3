"""VLMEvalKit TSV files (MMBench, MME, POPE, HallusionBench, MM-SafetyBench, ...).

Columns: `index`, `image` (base64) or `image_path`, `question`, `answer`, `category`,
option columns `A`, `B`, ... and `hint`. As VLMEvalKit's ImageBaseDataset.__init__
(vlmeval/dataset/image_base.py) does, an `image` cell of at most 64 characters is the
`index` of another row whose cell holds the image, and `image_path` is used only when there
is no `image` column. A row with options becomes a closed choice over the option texts
(the letters stay in `attributes.option_letters` / `answer_letter`); a file whose answers
are all yes/no becomes choices ["yes", "no"]; other rows keep a free-text answer. The
file stem is a tag; `category` an attribute, except in POPE files (stem containing
"pope"), where it is `attributes.pope_setting` and a comma-separated category (one
question shared by several settings, as VLMEvalKit's POPE_rating explodes it) becomes one
example per setting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from audit.errors import InputError
from audit.importers.base import Importer
from audit.importers.options import ImportOptions, attribute_name, check_target
from audit.importers.sources import Delimited, safe_path
from audit.importers.tabular import normal_split
from audit.importers.writer import DatasetWriter

__all__ = ["VLMEvalKitImporter", "mcq_prompt"]

REF_MAX = 64  # image_base.py: `if len(image_map[k]) <= 64: idx = image_map[k]` (a row index)
_ALLOWED = ("id", "prompt", "answer", "split", "pair_id", "varies")


def mcq_prompt(question: str, options: dict[str, str], hint: str | None) -> str:
    """VLMEvalKit's multiple-choice prompt, as ImageMCQDataset.build_prompt
    (vlmeval/dataset/image_mcq.py) writes it: the hint first, then the question, then the
    lettered options (which also lets generate-mode parsing read the letters)."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def plain_prompt(question: str, hint: str | None) -> str:
    """Without options, the hint is prepended the same way ("Hint: ...\\n")."""
    return f"Hint: {hint}\n{question}" if hint else question


class VLMEvalKitImporter(Importer):
    name = "vlmevalkit"
    version = "1"

    def __init__(self, sources: list[Path], *, opts: ImportOptions) -> None:
        super().__init__(sources, opts=opts)
        opts.refuse(self.name, "prompt", "choices", "pair_by", "varies")
        for field, target in opts.mapping:
            if field in ("image", "image_path"):
                raise InputError("the image columns are read as VLMEvalKit reads them and cannot be mapped",
                                 where=f"--map {field}={target}")
            if attribute_name(check_target(target)) is None and target not in _ALLOWED:
                raise InputError(f"a VLMEvalKit column can be mapped to {', '.join(_ALLOWED)} or "
                                 f"attributes.NAME, not {target!r}", where=f"--map {field}={target}")
        for path in sources:
            with Delimited(path, delimiter="\t") as table:  # checks the header now, before any writing
                header = table.header
            if "image" not in header and "image_path" in header:
                self.image_dirs.append((opts.images or path.parent).absolute())

    def run(self, writer: DatasetWriter) -> None:
        for path in self.sources:
            self._file(path, writer)

    # ------------------------------------------------------------------ one file
    def _roles(self, path: Path, header: list[str]) -> dict[str, Any]:
        user = dict(self.opts.mapping)
        missing = [c for c in user if c not in header]
        if missing:
            raise InputError(f"column {missing[0]!r} named by --map is not in the file (columns: "
                             f"{', '.join(header)})", where=str(path))
        by_target = {t: c for c, t in user.items() if attribute_name(t) is None}
        r = {"id": by_target.get("id", "index"), "prompt": by_target.get("prompt", "question"),
             "answer": by_target.get("answer", "answer" if "answer" in header else None)}
        for role in ("id", "prompt"):
            if r[role] not in header:
                raise InputError(f"no {r[role]!r} column (VLMEvalKit TSVs have index, image, question, answer, ...; "
                                 f"map another with --map COLUMN={role})", where=str(path))
        r["image"] = "image" if "image" in header and "image" not in user else None
        r["image_path"] = "image_path" if r["image"] is None and "image_path" in header else None
        r["hint"] = "hint" if "hint" in header and "hint" not in user else None
        r["options"] = [c for c in header if len(c) == 1 and "A" <= c <= "Z" and c not in user]
        r["pope"] = "pope" in path.stem.lower()
        r["category"] = "category" if "category" in header and "category" not in user else None
        special = {r["id"], r["prompt"], r["answer"], r["image"], r["image_path"], r["hint"], r["category"],
                   *r["options"]}
        extra = {c: user.get(c, f"attributes.{c}") for c in header
                 if c not in special and c not in ("image", "image_path")}
        r["extra"] = {c: t for c, t in extra.items() if t not in ("id", "prompt", "answer")}
        self.mapping[str(path)] = {
            r["id"]: "id", r["prompt"]: "prompt",
            **({r["answer"]: "answer (option letter -> option text)" if r["options"] else "answer"}
               if r["answer"] else {}),
            **({r["image"]: "image (base64, or the index of the row holding it)"} if r["image"] else {}),
            **({r["image_path"]: "image (path)"} if r["image_path"] else {}),
            **({r["hint"]: "prompt ('Hint: ...' before the question)"} if r["hint"] else {}),
            **({c: "choices (option text)" for c in r["options"]}),
            **({r["category"]: "attributes.pope_setting" if r["pope"] else "attributes.category"}
               if r["category"] else {}),
            **r["extra"]}
        return r

    def _file(self, path: Path, writer: DatasetWriter) -> None:
        with Delimited(path, delimiter="\t") as table:
            records, r = self._read(path, table, writer)
        yes_no = self._yes_no(records, r)
        for rec in records:
            for ex in self._examples(rec, r, path, yes_no):
                writer.add(ex, where=rec["where"], source=str(path))

    def _read(self, path: Path, table: Delimited, writer: DatasetWriter) -> tuple[list[dict[str, Any]], dict]:
        """Every kept row (without its image cell) and the roles of the columns; images are
        stored as they are read and references resolved at the end."""
        header = table.header
        r = self._roles(path, header)
        base = (self.opts.images or path.parent).absolute()
        records: list[dict[str, Any]] = []
        held: dict[str, str] = {}  # index -> stored image of rows holding one
        wanted: set[str] = set()  # indices other rows refer to
        n_rows = 0
        for line, fields in table:
            row = dict(zip(header, fields))
            idx = row[r["id"]].strip()
            at = f"{path} line {line}"
            if not idx:
                raise InputError("empty index", where=f"{at} column {r['id']!r}")
            if self.opts.limit is not None and n_rows >= self.opts.limit:
                # Past --limit, rows are read only for images that kept rows refer to.
                if idx in wanted and idx not in held and r["image"] and len(row[r["image"]].strip()) > REF_MAX:
                    held[idx] = writer.images.add_base64(row[r["image"]], where=f"{at} column 'image'")
                if wanted <= held.keys():
                    break
                continue
            n_rows += 1
            rec = {"where": at, "idx": idx, "row": {c: row[c] for c in header if c not in ("image", "image_path")}}
            cell = row[r["image"]].strip() if r["image"] else ""
            if cell.startswith("["):
                raise InputError("this row has several images; an mmaudit example has one",
                                 where=f"{at} column 'image'")
            if cell and len(cell) <= REF_MAX:
                rec["ref"] = cell
                wanted.add(cell)
            elif cell:
                rec["image"] = held[idx] = writer.images.add_base64(cell, where=f"{at} column 'image'")
            elif r["image_path"] and row[r["image_path"]].strip():
                raw = row[r["image_path"]].strip()
                if raw.startswith("["):
                    raise InputError("this row has several images; an mmaudit example has one",
                                     where=f"{at} column 'image_path'")
                where = f"{at} column 'image_path'"
                rec["image"] = writer.images.add_file(safe_path(base, raw, where=where), where=where, external=True)
            records.append(rec)
        for rec in records:
            if "ref" in rec:
                if rec["ref"] not in held:
                    raise InputError(f"refers to row index {rec['ref']!r}, which holds no image of its own "
                                     "(VLMEvalKit: an image cell of 64 characters or fewer is another row's index)",
                                     where=f"{rec['where']} column 'image'")
                rec["image"] = held[rec["ref"]]
        return records, r

    @staticmethod
    def _yes_no(records: list[dict[str, Any]], r: dict[str, Any]) -> bool:
        """A yes/no benchmark: no row has options and every given answer is yes or no."""
        if any(rec["row"][c].strip() for rec in records for c in r["options"]) or not r["answer"]:
            return False
        answers = [rec["row"][r["answer"]].strip().lower() for rec in records]
        given = [a for a in answers if a]
        return bool(given) and all(a in ("yes", "no") for a in given)

    def _examples(self, rec: dict[str, Any], r: dict[str, Any], path: Path, yes_no: bool) -> list[dict[str, Any]]:
        row, at = rec["row"], rec["where"]
        question = row[r["prompt"]].strip()
        if not question:
            raise InputError("empty question", where=f"{at} column {r['prompt']!r}")
        hint = row[r["hint"]].strip() if r["hint"] else ""
        answer = row[r["answer"]].strip() if r["answer"] else ""
        options = {c: row[c] for c in r["options"] if row[c].strip()}
        ex: dict[str, Any] = {"image": rec.get("image"), "tags": [path.stem], "attributes": {}}
        if options:
            ex["prompt"] = mcq_prompt(question, options, hint or None)
            texts = list(options.values())
            # Two options with the same text cannot be told apart by their text: score the letters.
            ex["choices"] = texts if len(set(texts)) == len(texts) else list(options)
            ex["attributes"]["option_letters"] = list(options)
            if answer:
                if answer not in options:
                    raise InputError(f"answer {answer!r} is not one of the options {', '.join(options)}",
                                     where=f"{at} column {r['answer']!r}")
                ex["answer"] = ex["choices"][list(options).index(answer)]
                ex["attributes"]["answer_letter"] = answer
        else:
            ex["prompt"] = plain_prompt(question, hint or None)
            if yes_no:
                ex["choices"] = ["yes", "no"]
            if answer:
                ex["answer"] = answer.lower() if yes_no else answer
        for col, target in r["extra"].items():
            value = row[col].strip()
            if not value:
                continue
            name = attribute_name(target)
            if name is not None:
                ex["attributes"][name] = value
            elif target == "split":
                ex["split"] = normal_split(value)
                if ex["split"] is None:
                    raise InputError(f"split {value!r} is not train, val(idation)/dev or test",
                                     where=f"{at} column {col!r}")
            else:
                ex[target] = value
        mapped_id = any(t == "id" for _, t in self.opts.mapping)
        base_id = rec["idx"] if mapped_id else f"{path.stem}-{rec['idx']}"
        category = row[r["category"]].strip() if r["category"] else ""
        if not r["pope"]:
            if category:
                ex["attributes"]["category"] = category
            return [dict(ex, id=base_id)]
        ex["tags"] = list(dict.fromkeys([*ex["tags"], "pope"]))
        settings = [s.strip() for s in category.split(",") if s.strip()]
        if not settings:
            return [dict(ex, id=base_id)]
        return [dict(ex, id=f"{base_id}-{s}", attributes={**ex["attributes"], "pope_setting": s}) for s in settings]
