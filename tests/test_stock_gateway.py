"""The HTTP API's tests again: kwollect-api in front of the stock-settings cluster.

Tests about the gateway process alone (configuration files, a dead database) are not
repeated: they do not depend on the server's settings.
"""

from __future__ import annotations

import pytest

import tests.test_gateway as base
from tests.test_gateway import *  # noqa: F403
from tests.test_gateway import data, http, token, utc  # noqa: F401

for _name in ("test_bad_connection_settings_fail_cleanly", "test_dead_database_is_reported",
              "test_postgrest_configuration_file"):
    if hasattr(base, _name):
        del globals()[_name]


@pytest.fixture(scope="module")
def kwdb(stock_kwdb):
    return stock_kwdb


@pytest.fixture(scope="module")
def gateway(stock_gateway):
    return stock_gateway
