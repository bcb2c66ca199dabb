"""A non-editable install must carry the templates, site assets and presets inside the wheel."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_templates_assets_and_presets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("atlasgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (REPO / "templates").glob("*.html"):
        assert f"atlasgen/templates/{template.name}" in names
    for asset in (REPO / "site_assets").iterdir():
        if asset.is_file() and asset.suffix in (".css", ".js"):
            assert f"atlasgen/site_assets/{asset.name}" in names
    assert "atlasgen/presets/tiny.toml" in names
    modules = [m.relative_to(REPO).as_posix() for m in (REPO / "atlasgen").rglob("*.py")]
    for package in ("atlasgen/stages/", "atlasgen/site/", "atlasgen/site/pages/"):
        assert f"{package}__init__.py" in modules, package
    for module in modules:  # sub-packages (stages, site, site/pages) too: each must be listed in pyproject.toml
        assert module in names, f"{module} is not in the wheel"
    assert any(n.startswith("atlasgen/templates/") and n.endswith(".html") for n in names), "no templates shipped"
