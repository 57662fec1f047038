"""Names from someone else's files shown safely (``fol_plugin.text``): Markdown and LaTeX tables,
terminals and logs."""
from __future__ import annotations

import subprocess
import sys

from fol_plugin.benchmark.tables import latex, markdown
from fol_plugin.text import latex_text, markdown_text, printable

from .conftest import REPO_ROOT

TAG = "x<img src=x onerror=alert(31)>.jpg"
TITLE_ESCAPE = "\x1b]0;pwned\x07\x1b[2J"


def test_markdown_cells_show_markup_and_delimiters_as_text():
    assert markdown_text(TAG) == "x&lt;img src=x onerror=alert(31)&gt;.jpg"
    assert markdown_text("a|b_c[e](javascript:f)`g`") == r"a\|b_c\[e\](javascript:f)\`g\`"
    assert markdown_text("two\nlines") == "two lines"


def test_latex_and_terminal_text_show_controls_as_escapes():
    assert latex_text("a_b & 50% #1") == r"a\_b \& 50\% \#1"
    assert printable(f"cannot decode {TITLE_ESCAPE}\n\tnext") == "cannot decode \\x1b]0;pwned\\x07\\x1b[2J\n\tnext"
    assert printable("caf\u00e9 \u0085") == "caf\u00e9 \\x85"  # C1 controls too, letters kept


def test_a_failed_dataset_named_with_markup_stays_text_in_the_tables():
    meta = {
        "method": "FoL", "backbone": "vitb", "image_size": [322, 322], "resize_mode": "original",
        "extraction_precision": "fp32", "rerank_topk": 100, "scorer": "fol", "published": None,
    }  # fmt: skip
    row = {
        "dataset": "toy", "query_set": "q|x", "published_as": None, "status": f"failed: cannot decode image {TAG}",
        "num_database": 17, "num_queries": 5, "database_features_s": None, "peak_memory_mb": None,
        **{f"{s}_{k}": None for s in ("global", "reranked", "published_global", "published_reranked") for k in ("R@1", "R@5", "R@10")},
        **{f"diff_{s}_R@1": None for s in ("global", "reranked")},
        **{f"{s}_ap": None for s in ("global", "reranked")}, **{f"{s}_ap_undefined": None for s in ("global", "reranked")},
        **{f"ms_per_query_{s}": None for s in ("features", "search", "rerank")},
    }  # fmt: skip
    table = markdown(meta, [row])
    assert "<img" not in table and "&lt;img src=x onerror=alert(31)&gt;" in table
    assert r"| q\|x |" in table
    row["query_set"] = "tokyo_night & 50%"
    assert r"tokyo\_night \& 50\% & -- &" in latex(meta, [row])


def test_a_file_name_with_terminal_escapes_is_printed_escaped(tmp_path):
    name = tmp_path / f"{TITLE_ESCAPE}.jpg"
    finished = subprocess.run(
        [sys.executable, "-m", "fol_plugin", "visualize", "--query", str(name), "--database", str(name)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert finished.returncode == 2
    assert "\x1b" not in finished.stderr and "\x07" not in finished.stderr
    assert "\\x1b]0;pwned\\x07\\x1b[2J.jpg does not exist" in finished.stderr
