"""FoL as a global extractor of cvg/Hierarchical-Localization (hloc).

Copy this file to ``hloc/extractors/fol.py`` (see README.md). Images arrive in [0, 1]; FoL
normalises them and rounds H and W to the nearest multiples of 14.
"""
from fol_plugin import load_model
from fol_plugin.data import normalize
from fol_plugin.models.resizing import PatchSizeResizer

from ..utils.base_model import BaseModel


class FoL(BaseModel):
    default_conf = {"backbone": "vitl", "weights": "auto"}
    required_inputs = ["image"]

    def _init(self, conf):
        self.net = PatchSizeResizer(load_model(conf["backbone"], conf["weights"], device="cpu"))

    def _forward(self, data):
        return {"global_descriptor": self.net(normalize(data["image"]))}
