#!/usr/bin/env bash
# Install the test dependencies, then run the whole test suite: unit, integration and
# end-to-end tests, each database test on SQLite and on the PostgreSQL server at
# 127.0.0.1:5432 (override with TAT_TEST_POSTGRES_URL). Arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh" test
./scripts/install_test_tools.sh

# tests/conftest.py stops at once, with the fix, when PostgreSQL tests are selected but
# the server does not accept connections.
exec .venv/bin/python -m pytest "$@"
