"""`mmaudit data import`: benchmark files -> a dataset folder (docs/format.md) + datacard.json.

Added to `mmaudit` through `audit.cli.COMMAND_MODULES`; the work is in audit.importers.
"""
from __future__ import annotations

import argparse

from audit.argtypes import positive_int

__all__ = ["add_commands", "cmd_import"]

_DESCRIPTION = """\
Import benchmark files into a new dataset folder: manifest.jsonl, images/ (PNG, JPEG and
WebP bytes kept as they are, named by content hash; other formats re-encoded to PNG) and
datacard.json (source SHA-256s, counts, the mapping used, licence, importer version).
The folder is built next to DATA_DIR and renamed into place at the end: a failed import
leaves nothing. `mmaudit run --data` also accepts these sources directly (imported once
into $MMAUDIT_CACHE/data/)."""

_FORMATS = """\
formats:
  vlmevalkit   VLMEvalKit TSV (MMBench, MME, POPE, HallusionBench, MM-SafetyBench, ...)
  pope         POPE question files (JSON lines, one file per setting); images from --images
  hf           Hugging Face save_to_disk folder or parquet files (needs mmaudit[hf])
  imagefolder  CSV of attributes with a file column (FairFace) or a folder of UTKFace-named images

--format auto:
"""


def add_commands(sub) -> None:
    from audit.importers.detect import AUTO_HELP

    d = sub.add_parser("data", help="import benchmark data (VLMEvalKit, POPE, Hugging Face, image folders)")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    i = dsub.add_parser("import", help="import benchmark files into a dataset folder", description=_DESCRIPTION,
                        epilog=_FORMATS + "  " + AUTO_HELP.replace("\n", "\n  "),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("sources", nargs="+", metavar="SRC", help="files or folders to import (one format)")
    i.add_argument("--format", default="auto", metavar="{auto,vlmevalkit,pope,hf,imagefolder}",
                   help="the sources' format (default auto: see below)")
    i.add_argument("--out", required=True, metavar="DATA_DIR", help="the new dataset folder (must not exist, or be empty)")
    i.add_argument("--images", metavar="DIR", help="folder the images named in the sources are read from (POPE, CSV "
                                                    "file columns, image paths); nothing outside it is read")
    i.add_argument("--map", action="append", default=None, metavar="FIELD=TARGET", dest="mapping",
                   help="send source column FIELD to TARGET: id, prompt, answer, image, choices, split, pair_id, "
                        "varies, tags or attributes.NAME (repeatable); POPE: setting=NAME")
    i.add_argument("--prompt", metavar="TEMPLATE", help="prompt for every row, with {column} fields (hf, imagefolder)")
    i.add_argument("--choices", metavar="A,B,...", help="closed set of answers for every row (hf, imagefolder)")
    i.add_argument("--pair-by", metavar="COL", help="rows sharing COL's value form one counterfactual set (pair_id)")
    i.add_argument("--varies", metavar="COL", help="the attribute that differs inside each set (needs --pair-by)")
    i.add_argument("--licence", metavar="TEXT", help="the data's licence, recorded in datacard.json")
    i.add_argument("--limit", type=positive_int, metavar="N", help="import only the first N rows of each source "
                                                                   "(of each split)")
    i.set_defaults(handler=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from audit.importers import import_sources

    card = import_sources(args.sources, out=args.out, format=args.format, images=args.images, mapping=args.mapping,
                          prompt=args.prompt, choices=args.choices, pair_by=args.pair_by, varies=args.varies,
                          licence=args.licence, limit=args.limit)
    counts = card["counts"]
    print(f"imported {counts['examples']} examples ({counts['images']} images) from {len(card['sources'])} "
          f"source(s) as {card['importer']['format']} into {args.out}")
    for key in ("by_split", "by_setting", "by_category"):
        if counts.get(key) and len(counts[key]) <= 20 and set(counts[key]) != {"none"}:
            print(f"  {key[3:]}: " + ", ".join(f"{k} {v}" for k, v in counts[key].items()))
    print(f"next: mmaudit run --data {args.out} --model MODEL --suite standard --out RUN_DIR")
    return 0
