"""get_metrics' tests again, against the cluster with PostgreSQL's stock settings."""

from __future__ import annotations

import pytest

from tests.test_get_metrics import *  # noqa: F403
from tests.test_get_metrics import data  # noqa: F401


@pytest.fixture(scope="module")
def kwdb(stock_kwdb):
    return stock_kwdb
