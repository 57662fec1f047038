"""First stage: global retrieval by exact nearest neighbours."""
from .search import DEFAULT_CHUNK_SIZE, exact_search

__all__ = ["DEFAULT_CHUNK_SIZE", "exact_search"]
