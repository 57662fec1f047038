"""``fol-vpr train`` with the tiny test ViT (``--backbone vitb`` builds it) that records the first
optimiser step: the loss of each batch and the gradients of the trainable weights, as rank 0
sees them, in ``$FOL_TEST_RECORD``. The aggregator's dropout is off: its random masks differ
with the number of processes (as between DataParallel's replicas), everything else must not.
Usage: ``[torchrun ...] tests/tiny_train.py train ...``."""
import os
import sys

import torch
from conftest import TINY_VIT

from fol_plugin import checkpoint, cli
from fol_plugin.models import FoLModel
from fol_plugin.train import loop



def tiny_model_without_dropout(backbone, **kwargs) -> FoLModel:
    model = FoLModel(TINY_VIT, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


checkpoint.FoLModel = tiny_model_without_dropout
losses = []
original_loss = loop.fol_loss


def recording_loss(*args, **kwargs):
    parts = original_loss(*args, **kwargs)
    losses.append(float(parts["total"]))
    return parts


class RecordingAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        if not getattr(self, "recorded", False) and os.environ.get("RANK", "0") == "0":
            grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
            torch.save({"losses": list(losses), "grads": grads}, os.environ["FOL_TEST_RECORD"])
        self.recorded = True
        return super().step(closure)


loop.fol_loss = recording_loss
loop.torch.optim.AdamW = RecordingAdamW

if __name__ == "__main__":
    sys.exit(cli.main())
