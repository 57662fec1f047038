"""FoL as an extractor + scorer pair of gbarbarani/re-ranking-for-VPR.

Copy this file to ``src/models/fol.py`` and import both classes in ``src/models/__init__.py``
(see README.md). The scorer's score is minus FoL's match count: that harness sorts ascending.
"""
from fol_plugin import load_model
from fol_plugin.data import load_image
from fol_plugin.matching import extract_local_features
from fol_plugin.rerank import MATCH_THRESHOLD, mutual_matches

from .base_model import BaseModel


class FoLExtractor(BaseModel):
    default_conf = {"backbone": "vitl", "weights": "auto", "image_size": (322, 322), "resize_mode": "original"}
    required_inputs = ["image"]

    def _init(self, conf):
        self.net = load_model(conf["backbone"], conf["weights"], device="cpu")

    def get_preprocessing(self):
        return load_image  # path -> [3, H, W] in [0, 1]

    def forward(self, data):
        size = tuple(self.conf["image_size"]) if self.conf["image_size"] else None
        features = extract_local_features(self.net, data["image"].cpu(), size, self.conf["resize_mode"])
        device = data["image"].device
        # keypoints [1, N, 2] in image pixels, descriptors [1, 128, N] (the harness's layout)
        return {"keypoints": features.keypoints[None].to(device), "descriptors": features.descriptors.T[None].to(device)}


class FoLScorer(BaseModel):
    default_conf = {"threshold": MATCH_THRESHOLD}
    required_inputs = ["keypoints0", "keypoints1", "descriptors0", "descriptors1"]

    def _init(self, conf):
        pass

    def forward(self, data):
        index0, index1 = mutual_matches(data["descriptors0"][0].T, data["descriptors1"][0].T, self.conf["threshold"])
        return {
            "score": -float(len(index0)),
            "keypoints0": data["keypoints0"][0][index0].cpu().numpy(),
            "keypoints1": data["keypoints1"][0][index1].cpu().numpy(),
        }
