"""Names from someone else's files, shown safely: in Markdown, in LaTeX and on a terminal or in a
log. A file name may hold anything a file system allows: markup (``<img onerror=...>``), table
delimiters, control characters (ESC sequences that clear the screen or set the terminal's title).
Each output format has one escaper here; no heavy imports."""
from __future__ import annotations

import html
import re

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip
# C0 controls but newline and tab, DEL and the C1 controls: what a terminal acts on.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Characters that change a Markdown table's structure or make a link or code span; a backslash
# shows them as text (emphasis marks such as ``_`` are left: names like SF_XL stay as they are).
MARKDOWN_SPECIAL = re.compile(r"([\\`\[\]|])")


def printable(text: str) -> str:
    """``text`` with every control character a terminal acts on shown as ``\\xNN`` (newlines and
    tabs kept): for anything printed to a terminal or written to a log."""
    return CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown table-cell text: HTML escaped (no tag runs), the cell delimiter
    ``|``, links' brackets and code spans' backticks backslash-escaped, line breaks and controls shown."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(printable(text).replace("\n", " "), quote=False))


def latex_text(text: str) -> str:
    """``text`` as literal LaTeX text (its special characters escaped, controls shown)."""
    return "".join(LATEX_SPECIAL.get(character, character) for character in printable(text).replace("\n", " "))
