"""A small typed client for the LMCache MP protocol, and a simulated CPU worker KV cache."""

from lmcache_rs.client.client import MPClient, ServerError
from lmcache_rs.client.shm_kv import ShmKVCache

__all__ = ["MPClient", "ServerError", "ShmKVCache"]
