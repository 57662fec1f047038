"""The paper's evaluation over named datasets (``fol-vpr benchmark``): the dataset registry
(:mod:`.registry`), FoL's published numbers (:mod:`.published`), the runner (:mod:`.runner`) and
the results tables (:mod:`.tables`)."""
from .published import PUBLISHED, published_recalls
from .registry import REGISTRY, DatasetSpec, QuerySetSpec, locate, select
from .runner import BenchmarkConfig, check_datasets, failure_summary, run_benchmark
from .tables import build_rows, write_tables

__all__ = [
    "PUBLISHED", "REGISTRY", "BenchmarkConfig", "DatasetSpec", "QuerySetSpec", "build_rows", "check_datasets",
    "failure_summary", "locate", "published_recalls", "run_benchmark", "select", "write_tables",
]
