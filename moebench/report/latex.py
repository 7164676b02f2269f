"""LaTeX tables in booktabs style (``\\toprule``, ``\\midrule``, ``\\bottomrule``; no vertical rules).

Each file is a complete ``table`` environment to ``\\input`` into a paper that loads ``booktabs``.
Cell text and captions are escaped (`escape`: a method or model name can hold any character); numeric
columns are right-aligned.
"""

from __future__ import annotations

import os

from moebench.util import atomic_write_text

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "\u00b1": r"\ensuremath{\pm}",
            "\n": " "}


def escape(text: str) -> str:
    """``text`` as literal LaTeX: the ten special characters, ``< > |`` (which the default font encoding
    would print as other glyphs) and newlines; ``±`` becomes ``\\pm``."""
    return "".join(_SPECIAL.get(ch, ch) for ch in str(text))


def _label(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-:" else "-" for ch in text)


def booktabs(header: list[str], rows: list[list[str]], caption: str, label: str,
             numeric_from: int | None = None, small: bool = True) -> str:
    """A booktabs ``table`` environment; a midrule separates groups where column 0 changes."""
    cols = "".join("r" if numeric_from is not None and i >= numeric_from else "l" for i in range(len(header)))
    lines = [r"\begin{table}[t]", r"\centering"]
    lines += [r"\small"] if small else []
    lines += [rf"\caption{{{escape(caption)}}}", rf"\label{{{_label(label)}}}",
              rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
              " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append(r"\midrule")
        previous = row[0]
        lines.append(" & ".join(escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> str:
    """Write ``text`` to ``path`` (folders created); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, text)
    return path
