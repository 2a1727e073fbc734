"""Packaging facts a wheel install depends on."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    """A package folder missing from pyproject's list would vanish from the wheel."""
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for import_name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([import_name, *rel.parts]) if rel.parts else import_name)
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_every_entry_point_module_exists() -> None:
    eps = _pyproject()["project"]["entry-points"]["avatar.plugins"]
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    for name, target in eps.items():
        top, *rest = target.split(".")
        base = ROOT / mapping[top]
        path = base.joinpath(*rest)
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), f"{name} -> {target}"


def test_core_never_imports_plugins() -> None:
    for py in (ROOT / "core").rglob("*.py"):
        text = py.read_text()
        assert "avatar_plugins" not in text, f"{py} imports a plugin module; the core must reach plugins only through entry points"
