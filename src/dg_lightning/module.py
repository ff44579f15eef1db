"""The discriminator's training objective as a LightningModule (paper Eq. 4 and Appendix B).

All three objectives are time-integrated Bregman divergences between the ratio estimate
r = d / (1 - d) = exp(logit) and the true ratio p_t / q_t; the time integral with weight lambda(t) is
realised by the importance-sampled t of the data module. Real rows have is_real = 1, fake rows 0.
"""

import contextlib
import math

import lightning as L
import torch
from torch.nn import functional as F

from dg_lightning.accel import Accel, prepare, run


@contextlib.contextmanager
def frozen(module):
    """Eval mode and no parameter gradients inside the block; each submodule's mode and parameter's requires_grad restored after."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


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

LR_SCHEDULES = {  # the learning-rate factor at optimiser step s of S
    "constant": lambda s, S: 1.0,
    "linear": lambda s, S: 1.0 - s / S,
    "cosine": lambda s, S: 0.5 * (1.0 + math.cos(math.pi * s / S)),
}


class LRFactor:
    """The factor LR_SCHEDULES[schedule](step, total_steps) that LambdaLR multiplies the base learning rate by."""

    def __init__(self, schedule, total_steps):
        self.schedule, self.total_steps = schedule, total_steps

    def __call__(self, step):
        return LR_SCHEDULES[self.schedule](min(step, self.total_steps), self.total_steps)


class EMA(torch.nn.Module):
    """An exponential moving average of parameters, kept in buffers (so checkpoints hold it). Update k (k = 1, 2, ...)
    sets average <- beta_k average + (1 - beta_k) theta_k with beta_k = min(decay, k / (k + 1)), starting from the
    initial theta_0: the plain mean of theta_0..theta_k while k + 1 <= 1 / (1 - decay), the EMA with `decay` after."""

    def __init__(self, params, decay):
        super().__init__()
        self.decay, self.count = decay, len(params)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        for i, p in enumerate(params):
            self.register_buffer(f"average{i}", p.detach().clone())

    def averages(self):
        """The averaged tensors, one per parameter, in the order given."""
        return [getattr(self, f"average{i}") for i in range(self.count)]

    @torch.no_grad()
    def update(self, params):
        """One update of the averages towards the current params."""
        self.num_updates += 1
        k = self.num_updates.item()
        beta = min(self.decay, k / (k + 1))
        for average, p in zip(self.averages(), params, strict=True):
            average.lerp_(p.detach(), 1.0 - beta)

    @torch.no_grad()
    def copy_to(self, params):
        """Overwrite params with the averages."""
        for average, p in zip(self.averages(), params, strict=True):
            p.copy_(average)


class DiscriminatorModule(L.LightningModule):
    """Trains d_phi(x_t, t) on diffused real (label 1) vs diffused fake (label 0) with Adam, the learning rate decayed
    by `lr_schedule` (LR_SCHEDULES) over the run's optimiser steps, and (ema_decay not None) an EMA of the trainable
    weights, which average_weights() puts into the network at the end of training.

    `accel` runs the discriminator on the GPU fast path (bf16 autocast, channels_last, compiled); the loss,
    the optimiser and the weights stay float32.
    """

    def __init__(self, discriminator: torch.nn.Module, objective="bce", lr=3e-4, weight_decay=1e-7, accel=Accel(),
                 lr_schedule="constant", ema_decay=None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"discriminator.objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"discriminator.lr_schedule must be one of {sorted(LR_SCHEDULES)}, got {lr_schedule!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"discriminator.ema_decay must be null or in (0, 1), got {ema_decay!r}")
        self.save_hyperparameters(ignore=["discriminator", "accel"])
        self.discriminator, self.accel = prepare(discriminator, accel), accel
        self.objective = OBJECTIVES[objective]()
        self.ema = None if ema_decay is None else EMA(self.trainable(), ema_decay)

    def trainable(self):
        """The discriminator's trainable parameters (a frozen feature extractor is excluded)."""
        return [p for p in self.discriminator.parameters() if p.requires_grad]

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

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Update the EMA after each optimiser step."""
        if self.ema is not None:
            self.ema.update(self.trainable())

    def average_weights(self):
        """Put the EMA weights (the ones guidance uses) into the discriminator; nothing without an EMA."""
        if self.ema is not None:
            self.ema.copy_to(self.trainable())

    @contextlib.contextmanager
    def guiding_weights(self):
        """Inside the block the discriminator holds the weights that guide (the EMA's with ema_decay, else its own),
        frozen and in eval mode; the training weights, modes and flags are restored after."""
        saved = None if self.ema is None else [p.detach().clone() for p in self.trainable()]
        if saved is not None:
            self.ema.copy_to(self.trainable())
        try:
            with frozen(self.discriminator):
                yield self.discriminator
        finally:
            if saved is not None:
                with torch.no_grad():
                    for p, weights in zip(self.trainable(), saved, strict=True):
                        p.copy_(weights)

    def on_save_checkpoint(self, checkpoint):
        """Leave the frozen parameters (a pretrained feature extractor: 190 MB for DG's CIFAR-10 classifier) out of
        the checkpoint's state dict: each checkpoint holds only what training changes."""
        fixed = {name for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in fixed}

    def on_load_checkpoint(self, checkpoint):
        """Fill the frozen parameters a checkpoint leaves out with this module's own, so strict loading still checks
        every other key."""
        fixed = {name: p.detach() for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {**{k: v for k, v in fixed.items() if k not in checkpoint["state_dict"]},
                                    **checkpoint["state_dict"]}

    def configure_optimizers(self):
        """Adam on the trainable parameters (the fused CUDA kernel on a GPU), its learning rate stepped every optimiser
        step by lr_schedule over the trainer's total steps."""
        params = self.trainable()
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(f"discriminator.lr_schedule={self.hparams.lr_schedule} decays over the run's steps, but "
                             "training is unbounded: set trainer.max_steps or trainer.max_epochs")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(self.hparams.lr_schedule, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
