"""The PostgreSQL the tests use (127.0.0.1:5432, user postgres, db test; ``EVCORE_TEST_PG_DSN``
overrides). Import it from here, not from ``conftest``: under the whole suite ``conftest`` names
whichever directory's conftest was imported last (tests/cloud's has no ``PG_DSN``)."""

from __future__ import annotations

import os

PG_DSN = os.environ.get("EVCORE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
