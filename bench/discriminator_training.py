"""DG discriminator training throughput, CIFAR-10 setting (frozen 32x32 ADM classifier features + DG head).

Two loops per variant:
  step    the optimiser loop alone on batches already on the device (the ceiling);
  trainer Lightning's Trainer with the RealFakeDataModule on uint8 arrays in host memory, diffused on the device
          (shows whether data loading starves the GPU: trainer img/s should be close to step img/s).
Variants: plain (float32, PyTorch's default TF32 settings) and fast (Accel.gpu(): bf16 autocast, channels_last,
torch.compile, cuDNN autotuning; Adam's fused kernel on a GPU), fast_graphs (fast with CUDA graphs). --profile adds the
top device kernels of one step.
Run: python bench/discriminator_training.py --batches 128,512   (CPU: --small --batches 8 --steps 3)
"""

import time
from dataclasses import replace

import lightning as L
import numpy as np
import torch
from common import (
    cifar10_discriminator,
    kernel_profile,
    machine,
    parser,
    peak_memory_gib,
    report,
    reset_peak_memory,
    set_defaults,
    timed,
    variant_names,
)

from dg_lightning.accel import Accel, set_backends
from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.module import DiscriminatorModule
from dg_lightning.sde import LinearVP

VARIANTS = {  # None: Accel() under PyTorch's default backend settings
    "plain": None,
    "fast": Accel.gpu(),
    "fast_nocompile": replace(Accel.gpu(), compile=None),
    "fast_graphs": Accel.gpu(compile="reduce-overhead"),  # CUDA graphs for the forward and backward
}


def optimiser_step(module, optimizer, batch):
    """One Adam step of the discriminator on a diffused batch; returns the loss (not synchronised)."""
    loss = module.objective(module(batch["x_t"], batch["t"]), batch["is_real"]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class StepClock(L.Callback):
    """Wall-clock seconds between the end of training batch `start` and the end of the last batch."""

    def __init__(self, start):
        self.start, self.t0, self.t1 = start, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.start:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, module):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.t1 = time.perf_counter()


def trainer_throughput(module, batch, steps, warmup, device, num_workers):
    """img/s of Trainer.fit of a (warm) module with the RealFakeDataModule over uint8 host arrays, after `warmup` batches."""
    rng = np.random.default_rng(0)
    n = batch * (steps + warmup)
    real = ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), name="real")
    fake = ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), name="fake")
    data = RealFakeDataModule(real, fake, batch_size=batch, num_workers=num_workers)
    clock = StepClock(warmup - 1)
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps + warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(module, data)
    return batch * steps / (clock.t1 - clock.t0)


def main():
    p = parser(__doc__)
    p.add_argument("--batches", default="128,512")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", type=variant_names(VARIANTS), default="plain,fast")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--trainer-batches", default="128", help="batch sizes that also run the Trainer + data module loop")
    p.add_argument("--profile", action="store_true", help="the top device kernels of one optimiser step")
    p.add_argument("--small", action="store_true", help="a narrow network, for a CPU smoke run")
    args = p.parse_args()
    device, torch_defaults = args.device, set_defaults()
    widths = {"model_channels": 64} if args.small else {}
    vp = LinearVP()
    result = {"benchmark": "discriminator_training", "machine": machine(device), "steps": args.steps, "results": {}}
    for batch_size in map(int, args.batches.split(",")):
        x0 = torch.rand(batch_size, 3, 32, 32, device=device) * 2 - 1
        t = vp.sample_time(batch_size, 1e-5, True, device=device)
        batch = {"x_t": vp.diffuse(x0, t, torch.randn_like(x0)), "t": t,
                 "is_real": torch.arange(batch_size, device=device) < batch_size // 2}
        for name in args.variants:
            accel = VARIANTS[name]
            set_backends(accel or Accel())
            if accel is None:
                accel = Accel()
                torch_defaults()
            torch.manual_seed(args.seed)
            module = DiscriminatorModule(cifar10_discriminator(**widths).to(device), accel=accel).train()
            optimizer = module.configure_optimizers()
            reset_peak_memory(device)
            def step(module=module, optimizer=optimizer, batch=batch):
                return optimiser_step(module, optimizer, batch)

            first, _ = timed(step, device, args.warmup)
            seconds, _ = timed(step, device, args.steps)
            figures = {"step_img_per_s": batch_size / seconds, "warmup_s_per_step": first,
                       "peak_gib": peak_memory_gib(device)}
            if args.profile:
                figures["kernel_profile"] = kernel_profile(step, device)
            if str(batch_size) in args.trainer_batches.split(","):
                figures["trainer_img_per_s"] = trainer_throughput(module, batch_size, args.steps, args.warmup, device,
                                                                  args.num_workers)
            result["results"][f"{name}/batch{batch_size}"] = figures
            print(name, batch_size, figures, flush=True)
        base = result["results"][f"{args.variants[0]}/batch{batch_size}"]
        for name in args.variants:
            figures = result["results"][f"{name}/batch{batch_size}"]
            figures["step_speedup"] = figures["step_img_per_s"] / base["step_img_per_s"]
    report(args, result)


if __name__ == "__main__":
    main()
