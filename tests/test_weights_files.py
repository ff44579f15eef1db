"""No weights file runs code: each kind the project reads, holding a pickle whose payload leaves a marker file, is
refused with the marker absent, while an unrestricted torch.load of the same file does leave it."""

import json
import re
from pathlib import Path

import pytest
import torch

from dg_lightning import checkpoints, evaluation, metrics
from dg_lightning.files import load_weights
from dg_lightning.pipelines.images import frozen
from dg_lightning.training import AtomicCheckpointIO
from payloads import leaves_a_marker

SRC = Path(__file__).resolve().parents[1] / "src" / "dg_lightning"


def load_vae(folder):
    """latents.load_vae on a folder holding a config.json and the weights file diffusion_pytorch_model.bin."""
    pytest.importorskip("diffusers")
    from dg_lightning.latents import load_vae as load
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return load(folder)


# (file kind, its file name, the project's reader of it): every kind of weights file the project reads.
READERS = {
    "ADM / DG classifier": ("32x32_classifier.pt", lambda path: checkpoints.load_adm_classifier(path, "cifar10")),
    "ADM 256 UNet": ("256x256_diffusion.pt", checkpoints.load_adm_unet),
    "DiT": ("DiT-XL-2-256x256.pt", checkpoints.load_dit),
    "FID Inception (torch-fidelity)": ("weights-inception-2015-12-05-6726825d.pth", metrics.inception_features),
    "ADM evaluator Inception": ("weights-inception-2015-12-05-6726825d.pth", evaluation.ADMInception),
    "Lightning checkpoint": ("last.ckpt", lambda path: AtomicCheckpointIO().load_checkpoint(path)),
    "a stage's network (digits score model, classifier)": ("net.pt", lambda path: frozen(torch.nn.Linear(1, 1), path)),
    "a stage's head, fakes, samples": ("discriminator.pt", load_weights),
    "SD-VAE .bin": ("diffusion_pytorch_model.bin", lambda path: load_vae(path.parent)),
}


@pytest.mark.parametrize("kind", READERS)
def test_a_weights_file_whose_pickle_runs_code_is_refused_and_its_payload_never_runs(tmp_path, kind):
    name, read = READERS[kind]
    marker, path = tmp_path / "executed", tmp_path / name
    torch.save({"weight": leaves_a_marker(marker)}, path)
    with pytest.raises(Exception) as error:
        read(path)
    assert not marker.exists(), f"{kind}: the payload ran"
    message = str(error.value)
    assert str(path if kind != "SD-VAE .bin" else path.parent) in message, message  # the file is named
    assert "posix.system" in message or kind == "SD-VAE .bin", message  # and what it would call (diffusers wraps it)
    assert "weights_only` set to `False`" not in message  # torch's advice to load it anyway is not passed on
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_no_module_reads_a_file_with_torch_load_but_the_one_loading_path():
    """Every torch.load call sits in files.load_weights (the project's one reader of weights files)."""
    calls = {path.relative_to(SRC).as_posix(): len(re.findall(r"\btorch\.load\(", path.read_text()))
             for path in SRC.rglob("*.py")}
    assert {path: n for path, n in calls.items() if n} == {"files.py": 1}
