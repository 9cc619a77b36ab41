"""write_report / rerender: the three files, escaping, a PDF that really shows something, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pytest
import torch
from PIL import Image
from report_sample import sample_grids, sample_report

from auditor.report import rerender, validate_report, write_report
from auditor.report.plots import image_grid

EVIL = "<script>alert('x')</script>Patch"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict]:
    """One API audit rendered once for the module (rendering takes seconds on 2 cores)."""
    report = sample_report("api")
    report["positive_controls"][1]["attack"] = EVIL
    grids = sample_grids()
    grids[EVIL] = grids.pop("Blended")
    written = write_report(report, tmp_path_factory.mktemp("report"), images=grids)
    return written, report


def _pdf_pages(path: Path) -> list[str]:
    pdf = pdfium.PdfDocument(str(path))
    try:
        return [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
    finally:
        pdf.close()


def test_write_report_writes_three_files_and_pngs(rendered) -> None:
    written, _ = rendered
    for name in ("report.json", "report.html", "report.pdf"):
        assert written[name].is_file() and written[name].stat().st_size > 1000
    pngs = [name for name in written if name.endswith(".png")]
    assert len(pngs) == 7  # 5 plots + 2 grids
    assert all(written[name].read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_report_json_lists_its_images(rendered) -> None:
    written, _ = rendered
    report = validate_report(json.loads(written["report.json"].read_text(encoding="utf-8")))
    assert {p.file for p in report.plots} == {
        "plot-positive-controls.png", "plot-per-class-accuracy.png", "plot-probe-families.png",
        "plot-refine-training.png", "plot-agreement-queries.png",
    }
    assert [i.file for i in report.images] == ["grid-badnets.png", "grid-script-alert-x-script-patch.png"]
    assert report.images[1].attack == EVIL


def test_html_has_verdict_attacks_and_escapes(rendered) -> None:
    written, report = rendered
    html = written["report.html"].read_text(encoding="utf-8")
    assert "Likely backdoored" in html
    assert "evidence of a backdoor" in html and "evidence, not proof" in html
    assert "BadNets" in html
    assert "Refit after REFINE epoch" in html and "50.9%" in html  # the surrogate's refits on T(x)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;Patch" in html
    assert html.count('src="data:image/png;base64,') == 7  # self-contained, no external assets
    assert 'src="http' not in html and "<link" not in html


def test_pdf_has_pages_and_is_not_blank(rendered, tmp_path: Path) -> None:
    written, _ = rendered
    pdf = pdfium.PdfDocument(str(written["report.pdf"]))
    try:
        assert len(pdf) >= 2
        image = pdf[0].render(scale=1.5).to_pil()
    finally:
        pdf.close()
    png = tmp_path / "page1.png"
    image.save(png)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.var() > 100  # text, tables and the verdict box, not an empty page
    text = _pdf_pages(written["report.pdf"])
    assert "Likely backdoored" in text[0]
    assert "Page 1 of" in text[0]
    assert any(EVIL in page for page in text)  # printed literally, not parsed as markup


def test_rerender_reproduces_html_and_pdf(rendered, tmp_path: Path) -> None:
    written, _ = rendered
    again = rerender(written["report.json"], tmp_path / "again")
    assert again["report.html"].read_text(encoding="utf-8") == written["report.html"].read_text(encoding="utf-8")
    assert _pdf_pages(again["report.pdf"]) == _pdf_pages(written["report.pdf"])
    assert (tmp_path / "again" / "report.json").is_file() and "grid-badnets.png" in again


def test_rerender_notes_a_missing_image(rendered, tmp_path: Path) -> None:
    written, _ = rendered
    data = json.loads(written["report.json"].read_text(encoding="utf-8"))
    (tmp_path / "report.json").write_text(json.dumps(data), encoding="utf-8")
    out = rerender(tmp_path / "report.json")
    html = out["report.html"].read_text(encoding="utf-8")
    assert "Image grid-badnets.png is missing." in html
    assert out["report.pdf"].is_file()


def test_failed_report_renders_without_results(tmp_path: Path) -> None:
    report = sample_report()
    for key in ("verdict", "timings", "refine", "utility", "probes"):
        report[key] = None
    report.update(status="failed", positive_controls=[],
                  error={"code": "invalid_checkpoint", "message": "Not a TorchScript archive & <b>bold</b>."})
    written = write_report(report, tmp_path)
    html = written["report.html"].read_text(encoding="utf-8")
    assert "Audit failed" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "Audit failed" in _pdf_pages(written["report.pdf"])[0]


def test_image_grid_upscales_with_nearest_neighbour(tmp_path: Path) -> None:
    checker = torch.zeros(4, 1, 28, 28)
    checker[:, :, ::2, ::2] = 1.0
    path = image_grid({"clean": checker, "triggered": checker.flip(-1), "transformed by T": 1 - checker},
                      tmp_path / "grid.png", title="BadNets")
    with Image.open(path) as image:
        width, height = image.size
        grey = np.asarray(image.convert("L"))
    assert width >= 4 * 76 and height >= 3 * 76  # 28 px upscaled 3x, minus layout margins
    # Smoothing would turn the 1-pixel checkerboard into a mass of greys; only label text is anti-aliased.
    assert ((grey > 5) & (grey < 250)).mean() < 0.03
    with pytest.raises(ValueError, match="N, 1|3, H, W"):
        image_grid({"clean": torch.zeros(28, 28)}, tmp_path / "bad.png")
