"""Regenerate the README's config reference from the JobConfig dataclasses.

python scripts/update_readme.py          # rewrite README.md in place
python scripts/update_readme.py --check  # exit 1 if the README is out of date (what the tests check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchtitan_hyena.config.manager import ConfigManager

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{ConfigManager.markdown_reference()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md config reference is out of date: run python scripts/update_readme.py", file=sys.stderr)
            raise SystemExit(1)
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
