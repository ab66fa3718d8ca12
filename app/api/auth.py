"""API keys: created by the CLI, stored as SHA-256 hashes, checked on every request in production.

A key is 32 random bytes, so a fast hash is enough: there is nothing to brute-force that a
slow password hash would protect. Only the hash and an 8-character prefix (to tell keys
apart in listings) are stored; the key itself is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import api_keys
from app.db.projects import new_id
from app.db.records import utc_now

KEY_PREFIX = "tat_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(connection: AsyncConnection, name: str) -> str:
    """Store a new key and return it; this is the only time the key is visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await connection.execute(
        api_keys.insert().values(
            id=new_id(), name=name, prefix=key[:8], key_hash=hash_key(key), created_at=utc_now()
        )
    )
    return key


async def is_valid_key(connection: AsyncConnection, key: str) -> bool:
    found = await connection.scalar(
        select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None))
    )
    return found is not None


async def revoke_api_key(connection: AsyncConnection, prefix: str) -> int:
    result = await connection.execute(
        update(api_keys)
        .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=utc_now())
    )
    return result.rowcount
