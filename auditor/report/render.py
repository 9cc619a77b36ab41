"""Write report.json, a self-contained report.html and an A4 report.pdf for one audit.

The JSON is the contract and is validated before anything is written; HTML and
PDF are views of it (plus the PNGs beside it), so ``rerender`` can rebuild them
later from report.json alone, e.g. after a template fix.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from auditor.report.content import ReportView, build_view
from auditor.report.pdf import write_pdf
from auditor.report.plots import image_grid, plot_report
from auditor.report.schema import ImageRef, Report, validate_report

log = logging.getLogger(__name__)

JSON_NAME, HTML_NAME, PDF_NAME = "report.json", "report.html", "report.pdf"

#: Per attack (or any grid title): row label -> images (N, C, H, W) in [0, 1], e.g. clean / triggered / transformed.
ImageGrids = Mapping[str, Mapping[str, torch.Tensor | np.ndarray]]

_env = Environment(
    loader=PackageLoader("auditor.report", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def write_report(report: Report | dict[str, Any], out_dir: Path, images: ImageGrids | None = None) -> dict[str, Path]:
    """Validate ``report``, draw its plots and image grids into ``out_dir``, and write JSON, HTML and PDF.

    Plots drawn from the report's data replace entries of ``report.plots`` with
    the same file name (others, drawn by the caller into ``out_dir``, are kept);
    ``images`` become one grid PNG each, appended to ``report.images``. Returns
    every written file by name (report.json, report.html, report.pdf, *.png) so
    the caller can store them as artifacts.
    """
    report = report if isinstance(report, Report) else validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = _write_grids(images or {}, out_dir, taken={ref.file for ref in report.images})
    drawn = plot_report(report, out_dir)
    kept = [p for p in report.plots if p.file not in {d.file for d in drawn}]
    report = validate_report(
        {**report.model_dump(mode="json"), "images": [r.model_dump() for r in [*report.images, *grids]],
         "plots": [p.model_dump() for p in [*kept, *drawn]]}
    )
    json_path = out_dir / JSON_NAME
    json_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    written = {JSON_NAME: json_path, **_render_views(report, out_dir, out_dir)}
    pngs = [out_dir / ref.file for ref in [*report.images, *report.plots]]
    written.update({png.name: png for png in pngs if png.is_file()})
    return written


def rerender(report_json_path: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Rebuild report.html and report.pdf from a report.json and the PNGs beside it.

    When ``out_dir`` differs from the JSON's folder, the JSON and its PNGs are
    copied there too, so the output folder is a complete report on its own.
    """
    report_json_path = Path(report_json_path)
    source_dir = report_json_path.parent
    out_dir = Path(out_dir) if out_dir is not None else source_dir
    report = validate_report(_load_json(report_json_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if out_dir.resolve() != source_dir.resolve():
        written = _copy_beside(report, report_json_path, out_dir)
    written.update(_render_views(report, source_dir, out_dir))
    return written


def render_html(report: Report, image_dir: Path) -> str:
    """The HTML document as a string, images inlined as data URIs so one file is the whole report."""
    return _html(report, build_view(report), image_dir)


def _html(report: Report, view: ReportView, image_dir: Path) -> str:
    return _env.get_template("report.html").render(report=report, view=view, images=_data_uris(view, image_dir))


def _render_views(report: Report, image_dir: Path, out_dir: Path) -> dict[str, Path]:
    html_path, pdf_path = out_dir / HTML_NAME, out_dir / PDF_NAME
    view = build_view(report)
    html_path.write_text(_html(report, view, image_dir), encoding="utf-8")
    write_pdf(report, view, image_dir, pdf_path)
    return {HTML_NAME: html_path, PDF_NAME: pdf_path}


def _load_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _copy_beside(report: Report, json_path: Path, out_dir: Path) -> dict[str, Path]:
    copied = {JSON_NAME: Path(shutil.copyfile(json_path, out_dir / JSON_NAME))}
    for ref in [*report.images, *report.plots]:
        source = json_path.parent / ref.file
        if source.is_file():
            copied[ref.file] = Path(shutil.copyfile(source, out_dir / ref.file))
    return copied


def _data_uris(view: ReportView, image_dir: Path) -> dict[str, str | None]:
    """file name -> data URI, or None when the PNG is missing (the HTML then says so instead of breaking)."""
    uris: dict[str, str | None] = {}
    for section in view.sections:
        for ref in section.figures:
            path = image_dir / ref.file
            if path.is_file():
                uris[ref.file] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            else:
                log.warning("report image %s is missing from %s", ref.file, image_dir)
                uris[ref.file] = None
    return uris


def _slug(name: str) -> str:
    """A safe file-name fragment from a free-text attack name (which may contain anything)."""
    slug = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in name.lower())
    return "-".join(part for part in slug.split("-") if part)[:60] or "grid"


def _write_grids(grids: ImageGrids, out_dir: Path, taken: set[str]) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for attack, rows in grids.items():
        stem, n = f"grid-{_slug(attack)}", 1
        file = f"{stem}.png"
        while file in taken:
            n += 1
            file = f"{stem}-{n}.png"
        taken.add(file)
        image_grid(rows, out_dir / file, title=attack)
        refs.append(ImageRef(file=file, caption=f"{attack}: {' / '.join(rows)}", attack=attack))
    return refs
