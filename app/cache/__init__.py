"""The cache and its backends: in-process, Redis and Redis Cluster.

``Cache`` is what the rest of the service uses: it builds versioned keys per kind, applies
each kind's TTL, counts hits and misses, and bypasses a backend that is down. Backends only
store bytes under keys.
"""

from app.cache.base import CacheBackend, CacheKind
from app.cache.service import Cache, build_cache

__all__ = ["Cache", "CacheBackend", "CacheKind", "build_cache"]
