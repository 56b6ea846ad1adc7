"""Rewrite the field table of docs/reference.md from lstm_lm/config.py's declarations.

python scripts/gen_reference.py          # tests/test_readme.py checks that it is current
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lstm_lm.config import reference_table  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
START, END = "<!-- fields:start -->", "<!-- fields:end -->"


def render(text: str) -> str:
    """`text` with the table between the markers replaced by the current one."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{reference_table()}{END}", text)


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PAGE}", file=sys.stderr)
