"""Every file the package reads at run time that is not Python ships in the wheel: it matches a
`[tool.setuptools.package-data]` pattern of pyproject.toml (setuptools leaves out anything that matches none)."""

from __future__ import annotations

from pathlib import Path

import pytest

import nnsae

tomllib = pytest.importorskip("tomllib")

PACKAGE_DIR = Path(nnsae.__file__).parent
PYPROJECT = PACKAGE_DIR.parent / "pyproject.toml"


def test_every_data_file_is_package_data():
    patterns = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["nnsae"]
    data_files = [p.relative_to(PACKAGE_DIR) for p in PACKAGE_DIR.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc", ".so", ".pyd") and "__pycache__" not in p.parts]
    assert {"dashboards/static/dashboard.css", "dashboards/static/index.js"} <= {f.as_posix() for f in data_files}
    shipped = {path.relative_to(PACKAGE_DIR) for pattern in patterns for path in PACKAGE_DIR.glob(pattern)}
    unshipped = [f.as_posix() for f in data_files if f not in shipped]
    assert not unshipped, f"Add these to [tool.setuptools.package-data] in pyproject.toml: {unshipped}"


def test_the_dashboard_inlines_its_static_files():
    from nnsae.dashboards import render

    page = render.index_page({"name": "s"}, [], {"n_tokens": 0}, None)
    for name, text in (("dashboard.css", render.CSS), ("index.js", render.INDEX_JS)):
        on_disk = (PACKAGE_DIR / "dashboards" / "static" / name).read_text(encoding="utf-8")
        assert text == on_disk and len(on_disk) > 1000
    assert f"<style>{render.CSS}</style>" in page and f"<script>{render.INDEX_JS}</script>" in page
    assert render.csp(render.INDEX_JS) in page.replace("&#x27;", "'")
