"""The discriminator's training objective as a LightningModule (paper Eq. 4 and Appendix B).

All three objectives are time-integrated Bregman divergences between the ratio estimate
r = d / (1 - d) = exp(logit) and the true ratio p_t / q_t; the time integral with weight lambda(t) is
realised by the importance-sampled t of the data module. Real rows have is_real = 1, fake rows 0.
"""

import lightning as L
import torch
from torch.nn import functional as F

from dg_lightning.accel import Accel, prepare, run


class BCELoss:
    """f(r) = r log r - (1 + r) log(1 + r): -log d on real, -log(1 - d) on fake (the paper's default)."""

    def __call__(self, logit, is_real):
        return torch.where(is_real, F.softplus(-logit), F.softplus(logit))


class LSIFLoss:
    """f(r) = (r - 1)^2 / 2: -r on real, r^2 / 2 on fake (least-squares importance fitting)."""

    def __call__(self, logit, is_real):
        return torch.where(is_real, -torch.exp(logit), 0.5 * torch.exp(2.0 * logit))


class UKLLoss:
    """f(r) = r log r - r: -log r on real, r on fake (unnormalised KL)."""

    def __call__(self, logit, is_real):
        return torch.where(is_real, -logit, torch.exp(logit))


OBJECTIVES = {"bce": BCELoss, "lsif": LSIFLoss, "ukl": UKLLoss}


class DiscriminatorModule(L.LightningModule):
    """Trains d_phi(x_t, t) on diffused real (label 1) vs diffused fake (label 0) with Adam.

    `accel` runs the discriminator on the GPU fast path (bf16 autocast, channels_last, compiled); the loss,
    the optimiser and the weights stay float32.
    """

    def __init__(self, discriminator: torch.nn.Module, objective="bce", lr=3e-4, weight_decay=1e-7, accel=Accel()):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"discriminator.objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        self.save_hyperparameters(ignore=["discriminator", "accel"])
        self.discriminator, self.accel = prepare(discriminator, accel), accel
        self.objective = OBJECTIVES[objective]()

    def forward(self, x_t, t, class_labels=None):
        """The float32 logit log(d / (1 - d)) at diffused inputs x_t (VP coordinates) and VP times t."""
        return run(self.discriminator, self.accel, x_t, t, class_labels)

    def training_step(self, batch, batch_idx):
        """Mean objective over a balanced batch of diffused real and fake samples."""
        logit = self(batch["x_t"], batch["t"], batch.get("class_labels"))
        is_real = batch["is_real"]
        loss = self.objective(logit, is_real).mean()
        accuracy = ((logit > 0) == is_real).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, batch_size=logit.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint):
        """Leave the frozen parameters (a pretrained feature extractor: 190 MB for DG's CIFAR-10 classifier) out of
        the checkpoint's state dict: each checkpoint holds only what training changes."""
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint):
        """Fill the frozen parameters a checkpoint leaves out with this module's own, so strict loading still checks
        every other key."""
        frozen = {name: p.detach() for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {**{k: v for k, v in frozen.items() if k not in checkpoint["state_dict"]},
                                    **checkpoint["state_dict"]}

    def configure_optimizers(self):
        """Adam on the trainable parameters (a frozen feature extractor is excluded); the fused CUDA kernel on a GPU."""
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        fused = all(p.is_cuda for p in params)
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
