"""The BEV feature cache: a trained model's BEV features per sample on disk, sharded, resumable, verified."""

from bevkit.cache.manifest import CacheError, load_manifest, merge, verify
from bevkit.cache.reader import CachedFeatures, collate_cached
from bevkit.cache.writer import CacheReport, write_cache

__all__ = ["CacheError", "CacheReport", "CachedFeatures", "collate_cached", "load_manifest", "merge", "verify",
           "write_cache"]
