"""The test suite's fixtures that benchmarks share: the reference weights in a torch.hub cache."""
from tests.conftest import parity_fixture, parity_torch_home  # noqa: F401
