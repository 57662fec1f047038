"""First stage: global retrieval by exact nearest neighbours."""
from .search import DEFAULT_SEARCH_CHUNK, exact_search, merge_top_k

__all__ = ["DEFAULT_SEARCH_CHUNK", "exact_search", "merge_top_k"]
