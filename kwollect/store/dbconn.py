"""Database connection options shared by the collectors and tools (reference names)."""

from __future__ import annotations

from typing import Any

DB_DEFAULTS: dict[str, Any] = {
    "db_host": "localhost",
    "db_port": "",
    "db_name": "kwdb",
    "db_user": "kwuser",
    "db_password": "",
    "db_password_file": "",
}


def connect_kwargs(conf: dict[str, Any]) -> dict[str, Any]:
    """asyncpg.connect/create_pool keyword arguments from reference-style options.

    Without db_port, libpq's PGPORT (then 5432) applies, as with the reference, which
    had no port option.
    """
    return {"host": conf["db_host"], "port": int(conf["db_port"]) if conf["db_port"] else None,
            "database": conf["db_name"], "user": conf["db_user"],
            "password": conf["db_password"] or None}
