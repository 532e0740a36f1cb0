"""Test configuration: every module in tests/fixtures/ is a pytest plugin (one per peer)."""

from pathlib import Path

pytest_plugins = [
    f"tests.fixtures.{path.stem}"
    for path in sorted((Path(__file__).parent / "fixtures").glob("*.py"))
    if path.stem != "__init__"
]
