"""A comparison's report, rebuilt from its folder: `document` decides what the report says (tables, figures,
verdicts) as a list of blocks, `render` writes blocks as Markdown and self-contained HTML, `plots` draws the figures.
``build_report(Plan.load(out), out)`` is ``attnlab report``."""

from .document import ReportFiles, build_report

__all__ = ["ReportFiles", "build_report"]
