"""``fol-vpr report``: a finished run or benchmark as one self-contained HTML file (:mod:`.html`),
read from the run's own outputs (:mod:`.data`), with embedded thumbnails and match figures
(:mod:`.media`) and inline SVG curves (:mod:`.svg`)."""
from .data import RunFolderError, read_folder
from .html import REPORT_FILE, ReportOptions, write_report

__all__ = ["REPORT_FILE", "ReportOptions", "RunFolderError", "read_folder", "write_report"]
