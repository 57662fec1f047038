"""Add FoL to a clone of gmberton/VPR-methods-evaluation: the lines of README.md, inserted for you.

    python add_fol.py /path/to/VPR-methods-evaluation [--hub owner/fol-plugin | --hub /path/to/fol-plugin]

Idempotent: a clone that already has the lines is left as it is.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

METHODS = ("fol", "fol-vitb")
MARKER = "# FoL (fol-plugin)"


def parser_lines() -> str:
    return (
        f"    {MARKER}\n"
        f"    if args.method in {METHODS!r}:\n"
        '        args.backbone = "Dinov2"\n'
        "        args.descriptors_dimension = 8448\n"
    )


def model_lines(hub: str) -> str:
    source = ', source="local"' if Path(hub).exists() else ""
    return (
        f"    {MARKER}\n"
        f"    if method in {METHODS!r}:\n"
        f'        model = torch.hub.load("{hub}", "get_trained_model"{source},\n'
        '                               backbone="vitb" if method == "fol-vitb" else "vitl")\n'
    )


def _insert_before_last_return(text: str, lines: str, returned: str) -> str:
    position = text.rindex(f"    return {returned}")
    return text[:position] + lines + text[position:]


def add_fol(root: Path, hub: str) -> None:
    """Insert the FoL lines into ``parser.py`` and ``vpr_models/__init__.py`` of ``root``."""
    parser_path, models_path = root / "parser.py", root / "vpr_models" / "__init__.py"
    parser_text = parser_path.read_text()
    if MARKER not in parser_text:
        choices = re.search(r'"--method",.*?choices=\[\n', parser_text, flags=re.S)
        if choices is None:
            raise ValueError(f"no --method choices list found in {parser_path}")
        parser_text = parser_text[: choices.end()] + "".join(f'            "{m}",\n' for m in METHODS) + parser_text[choices.end() :]
        parser_path.write_text(_insert_before_last_return(parser_text, parser_lines(), "args"))
    models_text = models_path.read_text()
    if MARKER not in models_text:
        models_path.write_text(_insert_before_last_return(models_text, model_lines(hub), "model"))


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("root", type=Path, help="the VPR-methods-evaluation clone")
    arguments.add_argument("--hub", default=str(Path(__file__).resolve().parents[2]), help="torch.hub source of fol-plugin")
    args = arguments.parse_args()
    add_fol(args.root, args.hub)
    print(f"FoL added to {args.root}: --method fol (ViT-L) or fol-vitb")


if __name__ == "__main__":
    main()
