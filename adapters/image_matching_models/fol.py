"""FoL as a matcher of gmberton/image-matching-models (``vismatch``).

Copy this file to ``vismatch/im_models/fol.py`` and register it in ``vismatch/__init__.py``
(see README.md). ``_forward`` follows the ``BaseMatcher`` contract: matched keypoints of both
images (FoL's thresholded mutual matches), all keypoints and all descriptors, in the pixels of
the images given; the harness then runs its own RANSAC.
"""
from fol_plugin import load_model
from fol_plugin.matching import extract_local_features, match

from vismatch import BaseMatcher


class FoLMatcher(BaseMatcher):
    def __init__(self, device="cpu", backbone="vitl", weights="auto", image_size=(322, 322), matcher="fol", **kwargs):
        super().__init__(device, **kwargs)
        self.model = load_model(backbone, weights, device)
        self.image_size = tuple(image_size) if image_size else None
        self.matcher = matcher

    def _forward(self, img0, img1):
        features0 = extract_local_features(self.model, img0.cpu(), self.image_size)
        features1 = extract_local_features(self.model, img1.cpu(), self.image_size)
        pairs = match(features0, features1, self.matcher).indices
        return (
            features0.keypoints[pairs[:, 0]],
            features1.keypoints[pairs[:, 1]],
            features0.keypoints,
            features1.keypoints,
            features0.descriptors,
            features1.descriptors,
        )
