"""report.pdf with reportlab platypus: the same view as the HTML, on A4 with page numbers.

Fonts are the DejaVu TTFs that ship inside matplotlib, registered with reportlab,
so the PDF renders arrows and non-Latin class names from a plain pip install.
All report text goes through ``escape`` because platypus Paragraphs parse markup.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import matplotlib
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak, Flowable, Image, KeepTogether, Paragraph, Preformatted, SimpleDocTemplate, Spacer, Table, TableStyle,
)

from auditor.report.content import Banner, ReportView, Section
from auditor.report.content import Table as TextTable
from auditor.report.plots import DPI
from auditor.report.schema import ImageRef, Report

MARGIN = 18 * mm
FRAME_WIDTH = A4[0] - 2 * MARGIN
INK, MUTED, LINE, SOFT = (colors.HexColor(c) for c in ("#1d2939", "#667085", "#d0d5dd", "#f2f4f7"))


@functools.cache
def _fonts() -> tuple[str, str, str]:
    """Register DejaVu Sans (regular, bold) and DejaVu Sans Mono once per process."""
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in (("DejaVuSans", "DejaVuSans.ttf"), ("DejaVuSans-Bold", "DejaVuSans-Bold.ttf"),
                       ("DejaVuSansMono", "DejaVuSansMono.ttf")):
        pdfmetrics.registerFont(TTFont(name, str(ttf / file)))
    pdfmetrics.registerFontFamily("DejaVuSans", normal="DejaVuSans", bold="DejaVuSans-Bold",
                                  italic="DejaVuSans", boldItalic="DejaVuSans-Bold")
    return "DejaVuSans", "DejaVuSans-Bold", "DejaVuSansMono"


@functools.cache
def _styles() -> dict[str, ParagraphStyle]:
    regular, bold, mono = _fonts()
    base = ParagraphStyle("body", fontName=regular, fontSize=9, leading=12.5, textColor=INK, spaceAfter=4)
    return {
        "body": base,
        "title": ParagraphStyle("title", base, fontName=bold, fontSize=18, leading=22, spaceAfter=2),
        "facts": ParagraphStyle("facts", base, textColor=MUTED, fontSize=8.5, spaceAfter=8),
        "h2": ParagraphStyle("h2", base, fontName=bold, fontSize=13, leading=16, spaceBefore=12, spaceAfter=6),
        "h3": ParagraphStyle("h3", base, fontName=bold, fontSize=9, textColor=MUTED, spaceBefore=6, spaceAfter=3),
        "small": ParagraphStyle("small", base, fontSize=8, leading=10.5, textColor=MUTED),
        "warning": ParagraphStyle("warning", base, textColor=colors.HexColor("#b54708"), leftIndent=8),
        "cell": ParagraphStyle("cell", base, fontSize=7.5, leading=9.5, spaceAfter=0),
        "cell_r": ParagraphStyle("cell_r", base, fontSize=7.5, leading=9.5, spaceAfter=0, alignment=TA_RIGHT),
        "head": ParagraphStyle("head", base, fontName=bold, fontSize=7.5, leading=9.5, spaceAfter=0),
        "head_r": ParagraphStyle("head_r", base, fontName=bold, fontSize=7.5, leading=9.5, spaceAfter=0,
                                 alignment=TA_RIGHT),
        "mono": ParagraphStyle("mono", base, fontName=mono, fontSize=6.5, leading=8.5, spaceAfter=0),
        "mono_r": ParagraphStyle("mono_r", base, fontName=mono, fontSize=6.5, leading=8.5, spaceAfter=0,
                                 alignment=TA_RIGHT),
        "pre": ParagraphStyle("pre", base, fontName=mono, fontSize=7, leading=9),
    }


def _p(text: str, style: str = "body") -> Paragraph:
    return Paragraph(escape(text), _styles()[style])


class _NumberedCanvas(Canvas):
    """Defers page output until the end so each footer can say "page i of n"."""

    def __init__(self, *args: Any, footer: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._footer = footer
        self._pages: list[dict[str, Any]] = []

    def showPage(self) -> None:  # noqa: N802 (reportlab's name)
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        for page in self._pages:
            self.__dict__.update(page)
            self._draw_footer(len(self._pages))
            super().showPage()
        super().save()

    def _draw_footer(self, total: int) -> None:
        self.setFont(_fonts()[0], 7.5)
        self.setFillColor(MUTED)
        self.setStrokeColor(LINE)
        self.line(MARGIN, MARGIN - 6 * mm, A4[0] - MARGIN, MARGIN - 6 * mm)
        self.drawString(MARGIN, MARGIN - 10 * mm, self._footer)
        self.drawRightString(A4[0] - MARGIN, MARGIN - 10 * mm, f"Page {self._pageNumber} of {total}")


def write_pdf(report: Report, view: ReportView, image_dir: Path, path: Path) -> Path:
    """Lay the view out on A4; images come from ``image_dir`` and missing ones are noted, not fatal."""
    doc = SimpleDocTemplate(str(path), pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=MARGIN,
                            bottomMargin=MARGIN, title=f"{view.title} {report.audit_id}", author="refine-audit",
                            subject="Backdoor audit with the REFINE defense")
    story = _header(view)
    for section in view.sections:
        story += _section(section, image_dir)
    footer = f"refine-audit {report.software.refine_audit} \u00b7 audit {report.audit_id}"
    doc.build(story, canvasmaker=lambda *a, **k: _NumberedCanvas(*a, footer=footer, **k))
    return path


def _header(view: ReportView) -> list[Flowable]:
    facts = " &nbsp;\u00b7&nbsp; ".join(f"{escape(name)}: <b>{escape(value)}</b>" for name, value in view.facts)
    caveat = [_p(view.caveat, "small")] if view.caveat else []
    return [_p(view.title, "title"), Paragraph(facts, _styles()["facts"]), _banner(view.banner), Spacer(1, 4),
            *caveat, Spacer(1, 4)]


def _banner(banner: Banner) -> Table:
    """A tinted box with a coloured left rule, like the HTML verdict line."""
    colour = colors.HexColor(banner.colour)
    label = ParagraphStyle("label", _styles()["title"], fontSize=14, leading=17, textColor=colour, spaceAfter=2)
    cells: list[Flowable] = [Paragraph(escape(banner.label), label), _p(banner.headline)]
    if banner.detail:
        cells.append(_p(banner.detail, "small"))
    box = Table([[cells]], colWidths=[FRAME_WIDTH])
    box.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(banner.background)),
        ("LINEBEFORE", (0, 0), (0, -1), 4, colour),
        ("LEFTPADDING", (0, 0), (-1, -1), 10), ("TOPPADDING", (0, 0), (-1, -1), 8),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 8),
    ]))
    return box


def _section(section: Section, image_dir: Path) -> list[Flowable]:
    story: list[Flowable] = [CondPageBreak(50 * mm), _p(section.title, "h2")]
    story += [_p(text) for text in section.paragraphs]
    story += [_p(f"\u2022 {text}", "warning") for text in section.bullets]
    for table in section.tables:
        caption = [_p(table.caption, "h3")] if table.caption else []
        story += caption + [_table(table), Spacer(1, 6)]
    story += [_figure(ref, image_dir) for ref in section.figures]
    if section.preformatted:
        story += [_p("Audit specification", "h3"),
                  Preformatted(section.preformatted, _styles()["pre"], maxLineLength=110, newLineChars="")]
    return story


def _column_widths(table: TextTable) -> list[float]:
    """Each column as wide as its longest text; if that overflows the frame, wrap the widest columns first.

    Narrow tables stay narrow instead of being stretched across the page.
    """
    styles = _styles()
    padding = 8 + 6  # cell padding plus a little air

    def width(text: str, style: str) -> float:
        return pdfmetrics.stringWidth(text, styles[style].fontName, styles[style].fontSize) + padding

    def style_of(column: int) -> str:
        return "mono" if column == table.mono_column else "cell"

    columns = range(len(table.header))
    natural = [max([width(table.header[c], "head")] + [width(row[c], style_of(c)) for row in table.rows])
               for c in columns]
    if sum(natural) <= FRAME_WIDTH:
        return natural
    # A column may wrap down to its longest header word (at least 40 pt), never narrower.
    floor = [min(natural[c], max([40.0] + [width(w, "head") for w in table.header[c].split()])) for c in columns]
    slack = FRAME_WIDTH - sum(floor)
    if slack <= 0:
        return [FRAME_WIDTH * f / sum(floor) for f in floor]
    stretch = [n - f for n, f in zip(natural, floor)]
    return [f + slack * s / sum(stretch) for f, s in zip(floor, stretch)]


def _table(table: TextTable) -> Table:
    def cell(text: str, column: int, head: bool) -> Paragraph:
        right = table.alignment(column) == "r"
        style = ("head" if head else "mono" if column == table.mono_column else "cell") + ("_r" if right else "")
        return _p(text, style)

    data = [[cell(text, c, True) for c, text in enumerate(table.header)]]
    data += [[cell(text, c, False) for c, text in enumerate(row)] for row in table.rows]
    flowable = Table(data, colWidths=_column_widths(table), repeatRows=1, hAlign="LEFT")
    flowable.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), SOFT),
        ("LINEBELOW", (0, 0), (-1, -1), 0.4, LINE),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 3), ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
        ("LEFTPADDING", (0, 0), (-1, -1), 4), ("RIGHTPADDING", (0, 0), (-1, -1), 4),
    ]))
    return flowable


def _figure(ref: ImageRef, image_dir: Path) -> Flowable:
    """The PNG scaled to the frame width (never enlarged past its natural size at DPI), with its caption."""
    path = image_dir / ref.file
    if not path.is_file():
        return _p(f"Image {ref.file} is missing.", "warning")
    width_px, height_px = ImageReader(str(path)).getSize()
    natural_width = width_px / DPI * 72
    width = min(FRAME_WIDTH, natural_width)
    height = width * height_px / width_px
    max_height = A4[1] - 2 * MARGIN - 30 * mm
    if height > max_height:
        width, height = width * max_height / height, max_height
    image = Image(str(path), width=width, height=height, hAlign="LEFT")
    parts: list[Flowable] = [image] + ([_p(ref.caption, "small")] if ref.caption else []) + [Spacer(1, 8)]
    return KeepTogether(parts)
