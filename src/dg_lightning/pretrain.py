"""Pretraining for settings without released models (digits): the EDM score model and the noise-aware classifier.

ScoreModule trains an EDM denoiser D(x; sigma) in EDM coordinates (x = x0 + sigma n) and keeps the EMA copy
that EDM samples with. NoisyClassifierModule trains an ADM EncoderUNet to classify LVP-diffused inputs
x_t = alpha(t) x0 + sigma_vp(t) z at ADM timesteps 999 t, the classifier whose middle-block features feed
DG's discriminator head. Both read batches {"x0", "class_labels"?} of clean samples from
clean_loader.
"""

import copy

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dg_lightning.data import ArraySource, keep_batch
from dg_lightning.progress import track
from dg_lightning.sde import LinearVP


class CleanBatches(Dataset):
    """Batches {"x0", "class_labels" when the source has labels} of clean samples, fetched at once (__getitems__)."""

    def __init__(self, source: ArraySource):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitems__(self, indices):
        x0, labels = self.source.fetch(torch.as_tensor(indices))
        return {"x0": x0} if labels is None else {"x0": x0, "class_labels": labels}

    def __getitem__(self, i):
        return self.__getitems__([i])


def clean_loader(source: ArraySource, batch_size, shuffle=True, drop_last=True, num_workers=0):
    """A DataLoader of clean batches from source (x0 as ArraySource.fetch gives it, int64 class labels). Its worker
    processes start again at every epoch (not persistent), so every epoch draws its worker seed from the global RNG,
    in a resumed run as in an uninterrupted one."""
    if batch_size < 1 or (drop_last and batch_size > len(source)):
        raise ValueError(f"batch_size must be between 1 and the {len(source)} samples of {source.name} "
                         f"(drop_last would leave no batch), got {batch_size}")
    return DataLoader(CleanBatches(source), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=keep_batch, num_workers=num_workers)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay):
    """ema <- decay ema + (1 - decay) net for every parameter; buffers are copied from net."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p_net.detach(), 1.0 - decay)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


def ema_decay(batch_images, images_seen, halflife_images, rampup_ratio=None):
    """EDM's per-step EMA decay 0.5^(batch_images / h): the EMA forgets half of its value every h images, with
    h = halflife_images, capped at rampup_ratio * images_seen when given (so the EMA copies the net at step 0)."""
    if rampup_ratio is not None:
        halflife_images = min(halflife_images, rampup_ratio * images_seen)
    return 0.5 ** (batch_images / max(halflife_images, 1e-8))


class ScoreModule(L.LightningModule):
    """Trains an EDM denoiser net(x, sigma, one-hot labels) with an EDM loss (dg_lightning.score_loss) by Adam with
    linear warm-up, keeping an EMA of the weights (EDM's training loop, Karras et al. 2022)."""

    def __init__(self, net: torch.nn.Module, loss, lr=1e-3, warmup_steps=0, ema_halflife_images=500_000,
                 ema_rampup_ratio=0.05):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0: no warm-up), got {warmup_steps}")
        if ema_halflife_images <= 0:
            raise ValueError(f"ema_halflife_images must be > 0 (images per halving), got {ema_halflife_images}")
        if ema_rampup_ratio is not None and ema_rampup_ratio <= 0:
            raise ValueError(f"ema_rampup_ratio must be > 0 or None (no ramp-up), got {ema_rampup_ratio}")
        self.save_hyperparameters(ignore=["net", "loss"])
        self.net = net
        self.loss = loss
        self.ema = copy.deepcopy(net).requires_grad_(False).eval()

    def train(self, mode=True):
        """Set the net's training mode; the EMA copy always stays in eval mode."""
        super().train(mode)
        self.ema.eval()
        return self

    def ema_network(self):
        """The EMA denoiser D(x; sigma) (EDM coordinates), the network used for sampling."""
        return self.ema

    def class_labels(self, batch):
        """One-hot float labels [B, label_dim] for a conditional net, None for an unconditional one."""
        if self.net.label_dim == 0:
            return None
        if "class_labels" not in batch:
            raise ValueError(f"a conditional score net (label_dim={self.net.label_dim}) needs a source with labels")
        return F.one_hot(batch["class_labels"], self.net.label_dim).float()

    def training_step(self, batch, batch_idx):
        """Mean EDM loss lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2 over the batch's elements."""
        x0 = batch["x0"]
        loss = self.loss(self.net, x0, self.class_labels(batch)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        self.batch_images = x0.shape[0] * self.trainer.world_size  # images in this step over all processes, for the EMA
        return loss

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then the EMA update: before the callbacks' on_train_batch_end, so a checkpoint saved
        there holds the EMA of the weights it holds."""
        super().optimizer_step(*args, **kwargs)
        images_seen = self.global_step * self.batch_images  # global_step counts this step only after the hook
        decay = ema_decay(self.batch_images, images_seen, self.hparams.ema_halflife_images, self.hparams.ema_rampup_ratio)
        ema_update(self.ema, self.net, decay)

    def configure_optimizers(self):
        """Adam with the learning rate ramped linearly from lr / warmup_steps to lr over warmup_steps steps."""
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        if self.hparams.warmup_steps == 0:
            return optimizer
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class NoisyClassifierModule(L.LightningModule):
    """Trains a noise-aware classifier p(y | x_t, t) by cross-entropy on x_t = alpha(t) x0 + sigma_vp(t) z (LVP),
    with a fresh t on [t_min, 1] (importance-sampled or uniform) and fresh z for every sample."""

    def __init__(self, classifier: torch.nn.Module, lr=3e-4, weight_decay=0.0, t_min=1e-5, importance=True):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {t_min}")
        self.save_hyperparameters(ignore=["classifier"])
        self.classifier = classifier
        self.vp = LinearVP()

    def forward(self, x_t, t):
        """Class logits [B, num_classes] at inputs x_t (VP coordinates) and LVP times t (B,), fed as timesteps 999 t."""
        return self.classifier(x_t, 999.0 * t)

    def training_step(self, batch, batch_idx):
        """Mean cross-entropy of the labels given freshly diffused x_t."""
        if "class_labels" not in batch:
            raise ValueError("the noisy classifier needs a source with class labels")
        x0, labels = batch["x0"], batch["class_labels"]
        t = self.vp.sample_time(x0.shape[0], self.hparams.t_min, self.hparams.importance, device=x0.device)
        logits = self(self.vp.diffuse(x0, t, torch.randn_like(x0)), t)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def configure_optimizers(self):
        """Adam with (L2) weight decay on the classifier's parameters."""
        return torch.optim.Adam(self.classifier.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)


def train_feature_classifier(net, images, labels, steps=500, lr=1e-3, seed=0, progress=True):
    """Full-batch Adam on cross-entropy of clean uint8 NHWC images (mapped to [-1, 1] NCHW); returns the net in eval mode."""
    torch.manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.as_tensor(labels)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in track(range(steps), "feature classifier", enabled=progress):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()
