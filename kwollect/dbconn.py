"""Database connection options shared by the collectors and tools (reference names)."""

from __future__ import annotations

from typing import Any

DB_DEFAULTS: dict[str, Any] = {
    "db_host": "localhost",
    "db_port": 5432,
    "db_name": "kwdb",
    "db_user": "kwuser",
    "db_password": "",
    "db_password_file": "",
}


def connect_kwargs(conf: dict[str, Any]) -> dict[str, Any]:
    """asyncpg.connect/create_pool keyword arguments from reference-style options."""
    return {"host": conf["db_host"], "port": conf["db_port"], "database": conf["db_name"],
            "user": conf["db_user"], "password": conf["db_password"] or None}
