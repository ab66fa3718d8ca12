#!/usr/bin/env bash
# Install the test dependencies, then run the whole test suite: unit, integration and
# end-to-end tests, each database test on SQLite and on the PostgreSQL server at
# 127.0.0.1:5432 (override with TAT_TEST_POSTGRES_URL). Arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh" test
./scripts/install_test_tools.sh

postgres_url="${TAT_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
if ! .venv/bin/python - "$postgres_url" <<'PYTHON'
import asyncio, sys
import asyncpg

async def probe(url: str) -> None:
    connection = await asyncpg.connect(url, timeout=5)
    await connection.close()

try:
    asyncio.run(probe(sys.argv[1]))
except Exception as exc:
    print(f"error: PostgreSQL at {sys.argv[1]} is not reachable ({exc}); start it, point "
          "TAT_TEST_POSTGRES_URL at a server where this user may create databases, or run "
          "`scripts/test.sh -m 'not postgres'` to test on SQLite only", file=sys.stderr)
    sys.exit(2)
PYTHON
then
    exit 2
fi

exec .venv/bin/python -m pytest "$@"
