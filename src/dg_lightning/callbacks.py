"""The Trainer's callbacks: periodic guided sampling while the discriminator trains (metrics per epoch, image grids,
best-epoch selection), the per-epoch RNG seeding that makes resumption exact, and the step-based progress bar.

Longer discriminator training can hurt (the paper: FID 1.66 after 10 epochs, 1.735 after 50), so
GuidedSamplingCallback samples with Discriminator Guidance every few epochs, measures the samples and
keeps the best epoch, its score and its discriminator weights.
"""

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from torchmetrics.utilities.distributed import gather_all_tensors
from torchvision.utils import save_image

from dg_lightning.distributed import rank_and_world_size
from dg_lightning.files import write_atomic
from dg_lightning.generate import sample_batches
from dg_lightning.shards import to_uint8
from dg_lightning import progress

MODES = ("min", "max")
BEST_DISCRIMINATOR = "best_discriminator.pt"
SAMPLES = "sampling"  # the callback's folder in its trainer's folder, unless out_dir says otherwise


def seed_global_rngs(*entropy):
    """Seed torch (every device), numpy and random from one hash of the integers `entropy` (numpy's SeedSequence)."""
    state = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    torch.manual_seed(state)
    np.random.seed(state)
    random.seed(state)


class EpochSeed(L.Callback):
    """Re-seeds the global RNGs (torch on every device, numpy, random) at the start of each training epoch from
    (seed, epoch, global rank).

    Everything an epoch draws from them (the batch order of a RandomSampler, the data module's diffusion times t and
    noise z, dropout) then depends only on the epoch and the weights, so a run resumed from an end-of-epoch checkpoint
    ends with the same weights as an uninterrupted one; ranks draw different noise.
    """

    def __init__(self, seed):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        """Seed torch, numpy and random with a hash of (seed, epoch, rank)."""
        seed_global_rngs(self.seed, trainer.current_epoch, trainer.global_rank)


class RNGStates(L.Callback):
    """Keeps every rank's global RNG states (torch on the CPU and every CUDA device, numpy, random) in each checkpoint
    and sets each rank's back on resume; it never draws from them. Rank 0 keeps the states that `seed` gave it, so a
    one-process run is unchanged; rank r > 0 is re-seeded from (seed, r) at setup, so ranks draw different noise.
    A resumed run draws, on every rank, the batch order and noise that the killed run would have drawn next."""

    def __init__(self, seed):
        self.seed = seed

    def setup(self, trainer, pl_module, stage):
        """Seed rank r > 0 apart from rank 0 (before Lightning restores a checkpoint's states)."""
        if trainer.global_rank > 0:
            seed_global_rngs(self.seed, trainer.global_rank)

    def state_dict(self):
        """{"ranks": every rank's states, in rank order} (gathered from all ranks: Lightning calls this on each);
        numpy's key array as an int64 tensor, so the checkpoint loads with weights_only=True."""
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                  "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
                  "random": random.getstate()}
        world_size = rank_and_world_size()[1]
        ranks = [None] * world_size
        if world_size > 1:
            torch.distributed.all_gather_object(ranks, states)
        else:
            ranks[0] = states
        return {"ranks": ranks}

    def load_state_dict(self, state_dict):
        """Set this rank's global RNGs to its saved states (CUDA: on the devices that this process has)."""
        rank, world_size = rank_and_world_size()
        saved = state_dict["ranks"]
        if len(saved) != world_size:
            raise ValueError(f"the checkpoint holds the RNG states of {len(saved)} ranks, this run has {world_size}; "
                             f"resume with {len(saved)} devices (trainer.devices x trainer.num_nodes), or delete the "
                             "stage's checkpoints/last.ckpt to start it again")
        states = saved[rank]
        torch.set_rng_state(states["torch"])
        for device, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
        kind, keys, *rest = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        random.setstate(states["random"])


def save_grid(images, path, epoch=None, results=None):
    """Write uint8 (N, C, H, W) images to path as one PNG grid of ceil(sqrt(N)) columns (a grid has no title: the
    epoch is in the file's name, the results in the logs)."""
    nrow = math.ceil(math.sqrt(len(images)))
    write_atomic(path, lambda f: save_image(images.float() / 255, f, format="png", nrow=nrow))


@dataclass
class SamplingTask:
    """What the guided-sampling callback samples and how it scores the samples, given by the pipeline whose
    discriminator trains: sample_fn(discriminator, latents, class_labels, noise) -> samples (B, *shape), by default
    images in [-1, 1] (B, C, H, W); convert(samples), what the metrics take (default: uint8 images); metrics, a module
    with update(converted samples, real), compute() -> {name: float}, reset() that keeps the real side, and the
    attributes `names` (what compute returns), `needs_real_images` and `keeps_real_features`; real_images, converted,
    fed to the metrics once (None when they need none); draw(first converted samples, path, epoch, results),
    the figure of each evaluation (default: an image grid); the latents' shape, the number of classes (None: unconditional) and the
    sampling batch size."""

    sample_fn: Callable
    metrics: torch.nn.Module
    shape: tuple
    real_images: torch.Tensor | None = None
    num_classes: int | None = None
    batch_size: int = 64
    convert: Callable = to_uint8
    draw: Callable = save_grid

    def __post_init__(self):
        """Check that the real images are what the metrics need, in the form they need them."""
        metrics, real_images = self.metrics, self.real_images
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SamplingTask batch_size must be a positive int, got {self.batch_size!r}")
        if metrics.needs_real_images and real_images is None:
            raise ValueError(f"SamplingTask real_images is None, but its metrics ({type(metrics).__name__}) need real "
                             "images (FID without a reference, precision / recall, KID)")
        if real_images is None:
            return
        if not metrics.needs_real_images:
            raise ValueError(f"SamplingTask real_images is given, but its metrics ({type(metrics).__name__}) use none "
                             "(FID from reference statistics, no precision / recall); pass real_images=None")
        if self.convert is to_uint8 and (not torch.is_tensor(real_images) or real_images.dtype != torch.uint8
                                         or real_images.ndim != 4):
            found = f"{real_images.dtype} {tuple(real_images.shape)}" if torch.is_tensor(real_images) else type(real_images).__name__
            raise TypeError(f"SamplingTask real_images must be a uint8 tensor (N, C, H, W), got {found}")
        if not metrics.keeps_real_features:
            raise ValueError("SamplingTask metrics must keep their real features across resets (GenerativeMetrics: "
                             "reset_real_features=False): the real images are fed once and must outlive every evaluation")


class GuidedSamplingCallback(L.Callback):
    """Every `every_n_epochs` training epochs, sample with DG by the module's weights that guide (the current ones, or
    their EMA with discriminator.ema_decay: DiscriminatorModule.guiding_weights) and evaluate; configured
    from conf/callbacks (callbacks.sampling) and bound by the training stage to the pipeline's SamplingTask (what to
    sample, how to score it). A fit with no task bound (pretraining) leaves it out (configured_callbacks).

    Sample i (of num_samples) has seed (seed, i), so the sample set is the same on any number of ranks and for any
    batch size; rank r draws the indices i with i % world_size == r. The task's sample_fn runs under torch.no_grad()
    with the discriminator in eval mode and its parameters frozen (guidance enables gradients for its input itself,
    as DiscriminatorGuidance does); modes and requires_grad flags are restored afterwards. The task's real images
    (each rank its share) are fed to its metrics once, at the first evaluation, which keep them.

    Each evaluation logs `{prefix}/<name>` for every metric of the task on every rank, so ModelCheckpoint can monitor
    them, and on rank 0 saves the task's figure of the first grid_size samples (an image grid unless the task draws
    another) to out_dir/samples_epoch{E}.png (E: the 0-based
    epoch index; out_dir None: <the trainer's folder>/sampling), logs it to any W&B logger as `{prefix}/samples`, and,
    when `monitor` improves (mode "min" or "max"), saves the discriminator's state_dict to
    out_dir/best_discriminator.pt (what discriminator.select=best guides with). best_epoch, best_score and history
    (one dict per evaluation: epoch and metrics) are kept in the callback's state in checkpoints.
    """

    def __init__(self, every_n_epochs=1, num_samples=200, seed=0, grid_size=64, monitor="fid", mode="min",
                 prefix="sampling", out_dir=None):
        for name, value in [("num_samples", num_samples), ("every_n_epochs", every_n_epochs), ("grid_size", grid_size)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GuidedSamplingCallback {name} must be a positive int, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"GuidedSamplingCallback seed must be an int >= 0, got {seed!r}")
        if mode not in MODES:
            raise ValueError(f"GuidedSamplingCallback mode must be one of {MODES}, got {mode!r}")
        self.every_n_epochs, self.num_samples, self.seed = every_n_epochs, num_samples, seed
        self.grid_size = min(grid_size, num_samples)
        self.monitor, self.mode, self.prefix = monitor, mode, prefix
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.task, self.real_images = None, None
        self.best_epoch, self.best_score, self.history = None, None, []

    def bind(self, task: SamplingTask):
        """Sample and score with `task` (a SamplingTask); its metrics must compute the monitored one."""
        if self.monitor not in task.metrics.names:
            raise ValueError(f"GuidedSamplingCallback monitor must be one of this experiment's sampling metrics "
                             f"{list(task.metrics.names)}, got {self.monitor!r} (set callbacks.sampling.monitor)")
        self.task, self.real_images = task, task.real_images
        return self

    def place(self, folder):
        """Write into out_dir, or (out_dir None) into <folder>/sampling: where a fit in folder puts it (setup)."""
        if self.out_dir is None:
            self.out_dir = Path(folder) / SAMPLES
        return self

    @property
    def state_key(self):
        """Unique per prefix, so two sampling callbacks keep separate states in a checkpoint."""
        return self._generate_state_key(prefix=self.prefix)

    def setup(self, trainer, pl_module, stage):
        """Check that a task is bound, that the module is a DiscriminatorModule and that every rank gets a sample;
        out_dir defaults to <the trainer's folder>/sampling."""
        if self.task is None:
            raise RuntimeError("GuidedSamplingCallback has no SamplingTask bound: call bind(task) before the fit")
        self.place(trainer.default_root_dir)
        if not callable(getattr(pl_module, "guiding_weights", None)):
            raise TypeError(f"GuidedSamplingCallback needs a DiscriminatorModule (its guiding_weights()), got "
                            f"{type(pl_module).__name__}")
        if self.num_samples < trainer.world_size:
            raise ValueError(
                f"GuidedSamplingCallback num_samples={self.num_samples} is below the number of processes "
                f"({trainer.world_size}): every rank needs at least one sample"
            )

    def on_train_epoch_end(self, trainer, pl_module):
        """Every every_n_epochs epochs: sample, measure, log, save the grid and track the best epoch."""
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        with pl_module.guiding_weights() as discriminator:
            results, grid = self._evaluate(trainer, pl_module, discriminator)
            # Already reduced over ranks (equal everywhere); sync_dist's mean keeps them and Lightning quiet.
            pl_module.log_dict({f"{self.prefix}/{name}": value for name, value in results.items()}, sync_dist=True)
            self.history.append({"epoch": epoch, **results})
            score = results[self.monitor]
            improved = self.best_score is None or (score < self.best_score if self.mode == "min" else score > self.best_score)
            if improved:
                self.best_epoch, self.best_score = epoch, score
            if trainer.is_global_zero:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._save_figure(trainer, grid, epoch, results)
                if improved:
                    state = discriminator.state_dict()
                    write_atomic(self.out_dir / BEST_DISCRIMINATOR, lambda f: torch.save(state, f))

    def _evaluate(self, trainer, pl_module, discriminator):
        """Sample this rank's share with `discriminator`, return (metrics over all ranks, the first grid_size samples
        in index order)."""
        rank, world_size, device = trainer.global_rank, trainer.world_size, pl_module.device
        show, task = trainer.is_global_zero, self.task
        metrics = task.metrics.to(device)
        if self.real_images is not None:
            for images in progress.track(self.real_images[rank::world_size].split(task.batch_size), f"{self.prefix}: real features", show):
                metrics.update(images.to(device), real=True)
            self.real_images = None
        indices = range(rank, self.num_samples, world_size)
        sample_fn = functools.partial(task.sample_fn, discriminator)
        batches = sample_batches(sample_fn, indices, task.shape, self.seed, task.num_classes, task.batch_size, device,
                                 out_shape=(None,) * len(task.shape))  # any size: e.g. latents decoded to images
        grid = []
        with torch.no_grad():
            for batch, samples, _ in progress.track(batches, f"{self.prefix}: sampling", show, total=math.ceil(len(indices) / task.batch_size)):
                samples = task.convert(samples)
                metrics.update(samples, real=False)
                grid.append(samples[: sum(i < self.grid_size for i in batch)])
        results = metrics.compute()
        metrics.reset()
        grid = torch.cat(grid)
        if world_size > 1:
            parts = gather_all_tensors(grid)
            grid = torch.stack([parts[i % world_size][i // world_size] for i in range(self.grid_size)])
        return results, grid

    def _save_figure(self, trainer, grid, epoch, results):
        """Write the task's figure of the first grid_size samples and log it to every W&B logger."""
        path = self.out_dir / f"samples_epoch{epoch}.png"
        self.task.draw(grid, path, epoch, results)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(f"{self.prefix}/samples", [str(path)], step=trainer.global_step, caption=[f"epoch {epoch}"])

    def state_dict(self):
        """The best epoch, its score and the history of evaluations."""
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict):
        """Restore best_epoch, best_score and history (a resumed run keeps them)."""
        self.best_epoch, self.best_score = state_dict["best_epoch"], state_dict["best_score"]
        self.history = [dict(h) for h in state_dict["history"]]


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar (same arguments); when training is step-based (trainer.max_steps > 0) one bar
    over the whole fit, "train steps (epoch e)" with optimiser steps done / max_steps and the ETA, where Lightning's
    restarts every epoch under "Epoch e/-2" (max_epochs -1 has no last epoch). Drawn on an interactive terminal only."""

    def setup(self, trainer, pl_module, stage):
        """Lightning's setup (rank 0 only draws); no bar off an interactive terminal."""
        super().setup(trainer, pl_module, stage)
        if not progress.interactive():
            self.disable()

    @staticmethod
    def step_based(trainer):
        """Whether the fit ends at trainer.max_steps optimiser steps."""
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self):
        """max_steps for step-based training (the bar's total), else Lightning's batches per epoch."""
        return self.trainer.max_steps if self.step_based(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch):
        """"train steps (epoch e)" for step-based training, else Lightning's "Epoch e/last"."""
        if self.step_based(self.trainer):
            return f"train steps (epoch {current_epoch})"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module):
        """Step-based: the one bar is made on the first epoch (at global_step, for a resumed fit) and renamed on the
        others; otherwise Lightning's bar per epoch."""
        if not self.step_based(trainer) or self.is_disabled or self.progress is None:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                             description=self._get_train_description(trainer.current_epoch))
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Step-based: the bar stands at global_step (optimiser steps, as max_steps counts); otherwise Lightning's."""
        if not self.step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
