"""The whole EDM-G++ CIFAR-10 recipe through run.py, timed per stage, and projected to the paper's counts.

Writes random-weight files in the released formats into --work: EDM's DDPM++ VP pickle (edm-cifar10-32x32-uncond-vp.pkl),
DG's 32x32 ADM classifier (32x32_classifier.pt), torch-fidelity's FID Inception, true_data.npz and an FID reference
(cifar10-32x32.npz). Then it runs `python run.py experiment=cifar10_edm_g++` on them at a scaled count and reads the run's
stage_times.json. It reports each stage's images per second, and the projected wall time of the paper's counts next to
the same projection for the authors' code from its measured anchors. The paper's counts are 50,000 fakes, 60 epochs on
50k + 50k, and 50,000 guided plus 50,000 unguided samples scored by FID-50k. The sampling callback is off in the timed
run. Its cost at the experiment's settings (every 10 epochs, 10,000 guided samples scored) is projected at the measured
guided rate.

    python bench/recipe.py --out recipe.json            # on a GPU: full-size networks, 20,480 fakes, 2 epochs
    python bench/recipe.py --small --out recipe.json    # on the CPU: the tiny files of +smoke=edm (CI)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    EDM_CIFAR10_KWARGS,
    ROOT,
    edm_cifar10_denoiser,
    machine,
    parser,
    randomized_zeros,
    report,
)
from netutils import write_edm_pickle, write_random_inception_weights
from omegaconf import OmegaConf

from dg_lightning.checkpoints import ADM_CLASSIFIERS

EXPERIMENT = "cifar10_edm_g++"
# The paper's counts (Table 2's EDM-G++ CIFAR-10 run) and the experiment's sampling callback.
PAPER = {"num_fake": 50_000, "num_real": 50_000, "epochs": 60, "num_samples": 50_000}
CALLBACK = OmegaConf.load(ROOT / "conf" / "experiment" / f"{EXPERIMENT}.yaml").callbacks.sampling
# The authors' code on one H200 (docs/performance.md): unguided and guided sampling, discriminator training (img/s).
AUTHORS = {"unguided": 92.0, "guided": 45.0, "training": 2590.0}


def write_full_size_files(folder, num_real, resolution=32):
    """The released files of experiment=cifar10_edm_g++ at full size, random weights, under their released names."""
    net = randomized_zeros(edm_cifar10_denoiser())
    write_edm_pickle(folder / "edm-cifar10-32x32-uncond-vp.pkl", net, EDM_CIFAR10_KWARGS)
    torch.save(randomized_zeros(ADM_CLASSIFIERS["cifar10"].build()).state_dict(), folder / "32x32_classifier.pt")
    write_random_inception_weights(folder)
    images = np.random.default_rng(0).integers(0, 256, (num_real, resolution, resolution, 3), dtype=np.uint8)
    np.savez(folder / "true_data.npz", images)
    np.savez(folder / "cifar10-32x32.npz", mu=np.zeros(2048), sigma=np.eye(2048))


def write_small_files(folder, num_real):
    """The tiny released-format files of +smoke=edm (tests/test_edm_pipeline.py's), with num_real real images."""
    from test_edm_pipeline import write_released_files

    write_released_files(folder, EXPERIMENT, write_edm_pickle, num_real)


def train_images(num_real, num_fake, batch_size, epochs):
    """Images the discriminator trains on: per epoch, max(reals, fakes) pairs in whole batches of batch_size / 2."""
    return epochs * (max(num_real, num_fake) // (batch_size // 2)) * batch_size


def projection(rate, counts, batch_size):
    """Seconds per stage of the recipe at `counts` from the rates (img/s) of generate, train, sample_unguided, sample."""
    return {
        "generate": counts["num_fake"] / rate["generate"],
        "train": train_images(counts["num_real"], counts["num_fake"], batch_size, counts["epochs"]) / rate["train"],
        "sample_unguided": counts["num_samples"] / rate["sample_unguided"],
        "sample": counts["num_samples"] / rate["sample"],
    }


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="the tiny files of +smoke=edm on the CPU (CI)")
    p.add_argument("--work", default=None, help="folder for the files and the run (default: a temporary one)")
    p.add_argument("--num-fake", type=int, default=None, help="fakes to train on (default 20,480; --small 32)")
    p.add_argument("--num-held-out", type=int, default=None, help="held-out reals and fakes (default 2,000; --small 4)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=None, help="guided and unguided samples (default 10,240; --small 16)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch (default 512, the anchors'; --small 8)")
    p.add_argument("--train-batch", type=int, default=None, help="discriminator batch (default 128; --small 8)")
    args = p.parse_args()
    small = args.small
    num_fake = args.num_fake or (32 if small else 20_480)
    num_held_out = args.num_held_out or (4 if small else 2_000)
    num_samples = args.num_samples or (16 if small else 10_240)
    batch, train_batch = args.batch or (8 if small else 512), args.train_batch or (8 if small else 128)
    num_real = num_fake + num_held_out  # as many reals as fakes are trained on, as in the paper

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        released = work / "released"
        released.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        (write_small_files if small else write_full_size_files)(released, num_real)
        write_seconds = time.perf_counter() - start
        overrides = [f"experiment={EXPERIMENT}", f"paths.released_dir={released}", "logger=csv",
                     f"data.num_real={num_real}", f"data.num_fake={num_fake}", f"data.num_held_out={num_held_out}",
                     f"data.batch_size={train_batch}", f"trainer.max_epochs={args.epochs}",
                     f"metrics.num_samples={num_samples}", f"metrics.batch_size={batch}",
                     f"callbacks.sampling.every_n_epochs={args.epochs + 1}"]  # no evaluation in the timed run
        if small:
            overrides.insert(1, "+smoke=edm")
        if torch.device(args.device).type == "cpu":
            overrides += ["trainer=default", "accel=none"]  # the experiment's own are the GPU's
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=work, capture_output=True,
                                text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        if result.returncode:
            sys.exit(f"run.py failed:\n{result.stderr[-4000:]}")
        (run_dir,) = (work / "logs" / EXPERIMENT / "runs").iterdir()
        times = json.loads((run_dir / "stage_times.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())

    images = {"load": 0, "generate": num_fake + num_held_out,
              "train": train_images(num_real - num_held_out, num_fake, train_batch, args.epochs),
              "sample_unguided": num_samples, "sample": num_samples}
    stages = {name: {**record, "images": images.get(name, 0),
                     "images_per_second": images[name] / record["seconds"] if images.get(name) else None}
              for name, record in times.items()}
    rate = {name: stages[name]["images_per_second"] for name in ("generate", "train", "sample_unguided", "sample")}
    ours = projection(rate, PAPER, train_batch)
    ours["load"] = stages["load"]["seconds"]
    callback = (PAPER["epochs"] // CALLBACK.every_n_epochs) * CALLBACK.num_samples / rate["sample"]
    authors = projection({"generate": AUTHORS["unguided"], "train": AUTHORS["training"],
                          "sample_unguided": AUTHORS["unguided"], "sample": AUTHORS["guided"]}, PAPER, train_batch)
    ours_total, authors_total = sum(ours.values()), sum(authors.values())
    report(args, {
        "benchmark": "recipe", "experiment": EXPERIMENT, "machine": machine(args.device), "small": small,
        "settings": {"num_real": num_real, "num_fake": num_fake, "num_held_out": num_held_out, "epochs": args.epochs,
                     "num_samples": num_samples, "batch": batch, "train_batch": train_batch,
                     "files_written_seconds": write_seconds},
        "stages": stages,
        "metrics": metrics,  # random weights: the figures mean nothing, they show the stages ran
        "paper_counts": PAPER,
        "projected_seconds": {"ours": ours, "ours_total": ours_total, "callback": callback,
                              "ours_total_with_callback": ours_total + callback,
                              "authors": authors, "authors_total": authors_total},
        "speedup_over_authors": authors_total / ours_total,
    })


if __name__ == "__main__":
    main()
