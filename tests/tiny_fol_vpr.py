"""``fol-vpr`` whose ``--backbone vitb`` builds the tiny test ViT: the command line as a
subprocess (under torchrun) runs in seconds. Usage: ``python tests/tiny_fol_vpr.py eval ...``."""
import sys

from conftest import TINY_VIT

from fol_plugin import checkpoint, cli
from fol_plugin.models import FoLModel

checkpoint.FoLModel = lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs)

if __name__ == "__main__":
    sys.exit(cli.main())
