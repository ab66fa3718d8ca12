"""API keys: created by the CLI, stored as SHA-256 hashes, checked on every request in production.

A key is 32 random bytes, so a fast hash is enough: there is nothing to brute-force that a
slow password hash would protect. Only the hash and an 8-character prefix (to tell keys
apart in listings) are stored; the key itself is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import RowMapping, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import api_keys
from app.db.projects import new_id
from app.db.records import utc_now

KEY_PREFIX = "tat_"
KEY_TOKEN_BYTES = 32
# token_urlsafe() encodes the bytes as unpadded base64: 4 characters per 3 bytes, rounded up.
KEY_LENGTH = len(KEY_PREFIX) + -(-KEY_TOKEN_BYTES * 4 // 3)
# Stored beside the hash so that listings can tell keys apart without revealing them.
PREFIX_LENGTH = 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(connection: AsyncConnection, name: str) -> str:
    """Store a new key and return it; this is the only time the key is visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_TOKEN_BYTES)
    await connection.execute(
        api_keys.insert().values(
            id=new_id(), name=name, prefix=key[:PREFIX_LENGTH], key_hash=hash_key(key), created_at=utc_now()
        )
    )
    return key


async def is_valid_key(connection: AsyncConnection, key: str) -> bool:
    found = await connection.scalar(
        select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None))
    )
    return found is not None


async def revoke_api_key(connection: AsyncConnection, key_or_prefix: str) -> int:
    """Revoke the active key equal to ``key_or_prefix``, or every active key with that prefix.

    Returns how many keys were revoked. Raises ValueError for text that is neither a whole
    key nor a stored prefix of exactly PREFIX_LENGTH characters.
    """
    if len(key_or_prefix) == PREFIX_LENGTH:
        matches = api_keys.c.prefix == key_or_prefix
    elif key_or_prefix.startswith(KEY_PREFIX) and len(key_or_prefix) == KEY_LENGTH:
        matches = api_keys.c.key_hash == hash_key(key_or_prefix)
    else:
        raise ValueError(
            f"{key_or_prefix!r} is neither a whole API key nor a key prefix of {PREFIX_LENGTH} "
            "characters; `python -m app.cli list-api-keys` shows the prefixes"
        )
    result = await connection.execute(
        update(api_keys).where(matches, api_keys.c.revoked_at.is_(None)).values(revoked_at=utc_now())
    )
    return result.rowcount


async def list_api_keys(connection: AsyncConnection) -> list[RowMapping]:
    """Return every key's prefix, name and dates, oldest first; never a key or its hash."""
    result = await connection.execute(
        select(api_keys.c.prefix, api_keys.c.name, api_keys.c.created_at, api_keys.c.revoked_at).order_by(
            api_keys.c.created_at
        )
    )
    return list(result.mappings())
