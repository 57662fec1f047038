"""``python -m fol_plugin eval ...``: the same as ``fol-vpr``."""
import sys

from .cli import main

sys.exit(main())
