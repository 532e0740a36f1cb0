"""docs/architecture.md keeps a true code map: every module under kwollect/ is named in it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent.parent


def code_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "## Code map" in text
    return text.split("## Code map", 1)[1]


def named(text: str, module: Path) -> bool:
    """A module is named by its path under kwollect/ (`store/spool.py`), or, inside a folder
    line, by its file name (`snmp.py` in the `dev/simulators/` line); a package by its folder."""
    relative = module.relative_to(ROOT / "kwollect")
    if module.name == "__init__.py":
        folder = relative.parent.as_posix()
        return folder == "." or f"`{folder}/`" in text or f"`kwollect/{folder}/`" in text
    if f"`{relative.as_posix()}`" in text or f"`kwollect/{relative.as_posix()}`" in text:
        return True
    folder_lines = [line for line in text.splitlines()
                    if f"`{relative.parent.as_posix()}/`" in line]
    return any(f"`{module.name}`" in line for line in folder_lines)


def test_every_module_under_kwollect_is_in_the_code_map():
    text = code_map()
    modules = sorted((ROOT / "kwollect").rglob("*.py"))
    assert len(modules) > 50
    missing = [str(m.relative_to(ROOT)) for m in modules if not named(text, m)]
    assert missing == [], "add a line for each to the code map in docs/architecture.md"


def test_the_readme_layout_names_every_folder_of_the_tree():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    folders = [p.name for p in ROOT.iterdir()
               if p.is_dir() and not p.name.startswith(".") and p.name not in ("build", "dist")
               and not p.name.endswith(".egg-info")]
    folders += [p.name for p in (ROOT / "kwollect").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()]
    assert [f for f in folders if f"{f}/" not in layout] == []
