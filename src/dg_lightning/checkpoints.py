"""Loaders for the released checkpoints DG builds on.

- EDM network pickles (`edm-*.pkl`) are read by a whitelisting unpickler that never runs code from the
  file: each `torch_utils.persistence` object becomes an inert record (class name and `__dict__`), the
  constructor arguments it recorded build our own `dg_lightning.nets.edm` module, and the weights load
  into it with strict=True. The Python source embedded in the pickle is ignored.
- ADM classifiers and DG's discriminator heads are plain state dicts, read with
  `files.load_weights` (weights_only=True) and loaded strictly into `dg_lightning.nets.adm` modules.
- Soft Truncation's score models are its training checkpoints {optimizer, model, ema, step}, read the same way; their
  EMA (or raw) weights load strictly into `dg_lightning.nets.ncsnpp`.
- LSGM's checkpoint_fid.pt {epoch, global_step, args, best_score_fid, best_score_nll, dae_state_dict, vae_state_dict}
  is read the same way with four inert classes allowed besides tensors (its argparse.Namespace and a numpy float); the
  score model loads strictly into `dg_lightning.nets.ncsnpp.lsgm_cifar10`, the NVAE's weights come back as a dict.

Every loader returns its network on the CPU, in eval mode, with requires_grad False. A state dict that
does not fit the expected network raises a CheckpointError naming the file and the first differing keys.
"""

import argparse
import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dg_lightning.files import UnsafeWeightsError, load_weights
from dg_lightning.nets import adm, dit, edm, ncsnpp, nvae, unet
from dg_lightning.sde import LinearVP, cosine_time_from_tau

EDM_SOURCE = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/ (e.g. edm-cifar10-32x32-uncond-vp.pkl)"
DG_SOURCE = "the Google Drive folders listed in the README of github.com/alsdudrla10/DG"
DG_IMAGENET_SOURCE = "the Google Drive folders listed in the README of github.com/alsdudrla10/DG_imagenet"
ADM_SOURCE = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_classifier.pt"
ADM_SOURCE_256 = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ (256x256_diffusion.pt, 256x256_classifier.pt)"
DIT_SOURCE = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
LSGM_SOURCE = ("https://drive.google.com/drive/folders/16kbwAeDZyCu1YRCXAXeh-KRyq8M09Rb0 (the README of "
               "github.com/NVlabs/LSGM, \"Checkpoints\"): the CIFAR-10 run \"LSGM (best FID)\", its LSGM checkpoint "
               "checkpoint_fid.pt (score model and VAE; not the NVAE stage-1 checkpoint beside it)")
SOFT_TRUNCATION_SOURCE = ("https://drive.google.com/drive/folders/1Wyk0ucFW-QDS_g1EcPm361LWWgWqJ6L_ (the README of "
                          "github.com/Kim-Dongjun/Soft-Truncation): the CelebA 64 checkpoint of "
                          "configs/vp/CELEBA/ddpmpp_fid_st.py, saved by its run_lib as checkpoint_<step>.pth")

# The preconditioned networks an EDM pickle may hold under "ema".
PRECONDITIONERS = {cls.__name__: cls for cls in (edm.VPPrecond, edm.VEPrecond, edm.iDDPMPrecond, edm.EDMPrecond)}
PERSISTENCE_VERSION = 6  # torch_utils.persistence format of every released EDM (and StyleGAN3) pickle
MAX_LISTED_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, or not holding the expected network."""


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside the loader's whitelist; nothing from it was called."""


@dataclass(frozen=True)
class _PersistentObject:
    """Inert stand-in for an object pickled by EDM's torch_utils.persistence: its class name and `__dict__`."""

    class_name: str
    state: dict


class _ModuleDict:
    """Inert stand-in for torch.nn.ModuleDict (pickled as a stock class): keeps the state pickle hands over."""

    def __setstate__(self, state):
        self.state = state


def _persistent_object(meta):
    """Our replacement for torch_utils.persistence._reconstruct_persistent_obj: records, never executes, `meta`."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and meta.get("version") == PERSISTENCE_VERSION
            and isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)):
        summary = {k: meta.get(k) for k in ("type", "version")} if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"unsupported torch_utils.persistence record {summary}; expected a class record of "
                         f"version {PERSISTENCE_VERSION} with a class_name and a state dict")
    return _PersistentObject(meta["class_name"], meta["state"])


def _load_storage(data):
    """torch.storage._load_from_bytes through torch's own weights-only loader (the nested legacy torch.save blob)."""
    return load_weights(io.BytesIO(data))


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's multiarray.scalar, whatever this numpy calls its module

# The closed set of globals an EDM network pickle references.
_EDM_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # numpy scalars in the blocks' recorded kwargs; numpy 1.x writers (the released files) spell the module
    # numpy.core, numpy 2 writers numpy._core.
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "dtype"): np.dtype,
}


class _EDMUnpickler(pickle.Unpickler):
    """Unpickler that resolves only _EDM_GLOBALS and refuses every other global."""

    def __init__(self, file):
        super().__init__(file)
        self.path = file.name

    def find_class(self, module, name):
        """The whitelisted stand-in for module.name, or ForbiddenGlobalError."""
        try:
            return _EDM_GLOBALS[module, name]
        except KeyError:
            raise ForbiddenGlobalError(
                f"{self.path}: refused to load global {module}.{name}: it is not one of the names an EDM network "
                "pickle uses, so the file may be malicious or is not an EDM network pickle; nothing was executed"
            ) from None


def _existing(path, source):
    """path as a Path; FileNotFoundError saying where the released file comes from if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; source of the released file: {source}")
    return path


def _flat_state_dict(obj, prefix=""):
    """The state dict of a reconstructed module tree, keyed and ordered as nn.Module.state_dict() would be."""
    state = obj.state
    skip = state.get("_non_persistent_buffers_set", ())
    tensors = [*state["_parameters"].items(), *((k, v) for k, v in state["_buffers"].items() if k not in skip)]
    flat = {prefix + name: tensor for name, tensor in tensors if tensor is not None}
    for name, child in state["_modules"].items():
        if child is not None:
            flat.update(_flat_state_dict(child, f"{prefix}{name}."))
    return flat


def _key_report(keys, label):
    """'label (count): k1, ..., k5 (and N more)' for a non-empty key list, else None."""
    if not keys:
        return None
    more = f" (and {len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{label} ({len(keys)}): {', '.join(keys[:MAX_LISTED_KEYS])}{more}"


def _build_and_load(build: Callable[[], torch.nn.Module], state, path, architecture, entry=None):
    """Build a network, strict-load `state` into it (its tensors replace the fresh ones), return it frozen in eval mode.

    Entries that are not tensors raise CheckpointError naming the file, the file's `entry` that holds the state (when
    given) and the first of them; a mismatch raises it naming the file, the architecture and the first missing,
    unexpected and wrongly shaped keys.
    """
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        holder = f"{entry} has " if entry else ""
        raise CheckpointError(f"{path}: {holder}{_key_report(not_tensors, 'entries that are not tensors')}")
    net = build()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {list(state[k].shape)} in file vs {list(v.shape)} in model"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [r for r in (_key_report(missing, "missing keys"), _key_report(unexpected, "unexpected keys"),
                            _key_report(reshaped, "shape mismatches")) if r]
    if problems:
        raise CheckpointError(f"{path} does not match {architecture}:\n  " + "\n  ".join(problems)
                              + "\nCheck that the file is the checkpoint of this architecture.")
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def load_edm(path, key="ema") -> torch.nn.Module:
    """EDM's network `key` from a released network pickle, rebuilt as our dg_lightning.nets.edm preconditioner
    without executing anything from the file."""
    path = _existing(path, EDM_SOURCE)
    with open(path, "rb") as file:
        try:
            data = _EDMUnpickler(file).load()
        except ForbiddenGlobalError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path} as an EDM network pickle ({type(exc).__name__}: {exc}); the file may be "
                f"truncated or corrupt (download it again from {EDM_SOURCE}) or be another format"
            ) from exc
    if not isinstance(data, dict) or key not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} has no network under key {key!r} (found {found}); EDM pickles keep it "
                              "under 'ema'")
    record = data[key]
    if not isinstance(record, _PersistentObject):
        raise CheckpointError(f"{path}: {key!r} holds a {type(record).__name__}, not a persistent EDM network")
    cls = PRECONDITIONERS.get(record.class_name)
    if cls is None:
        raise CheckpointError(f"{path}: {key!r} holds a {record.class_name}, which is not one of the supported "
                              f"networks {sorted(PRECONDITIONERS)}")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if kwargs is None:
        raise CheckpointError(f"{path}: the {record.class_name} under {key!r} did not record its constructor "
                              "arguments (_init_kwargs), so it cannot be rebuilt")
    try:
        state = _flat_state_dict(record)
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: the {record.class_name} under {key!r} is not laid out like a torch module "
                              f"({type(exc).__name__}: {exc})") from exc
    architecture = f"{record.class_name}(**{kwargs})"

    def build():
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot build {architecture} from the pickle's recorded arguments: "
                                  f"{exc}") from exc

    return _build_and_load(build, state, path, architecture)


@dataclass(frozen=True)
class AdmConfig:
    """A released ADM classifier: its builder, the map from LVP time its training schedule needs (None: identity),
    and where the classifier and the DG heads trained on its features are published."""

    build: Callable[[], adm.EncoderUNet]
    time_map: Optional[Callable[[torch.Tensor], torch.Tensor]]
    source: str
    head_source: str


ADM_CLASSIFIERS = {
    # DG's CIFAR-10 32x32_classifier.pt; heads discriminator_60.pt (uncond), discriminator_250.pt (cond).
    "cifar10": AdmConfig(adm.cifar10_classifier, None, DG_SOURCE, DG_SOURCE),
    # DG_imagenet's 32x32_classifier.pt on SD-VAE latents; head discriminator_7.pt (cond).
    "latent": AdmConfig(adm.latent_classifier, None, DG_IMAGENET_SOURCE, DG_IMAGENET_SOURCE),
    # OpenAI's 64x64_classifier.pt, trained on the cosine schedule; no DG head was released for it.
    "adm64": AdmConfig(adm.adm64_classifier, cosine_time_from_tau, ADM_SOURCE,
                       "none, DG released no head for this classifier (train your own)"),
    # OpenAI's 256x256_classifier.pt (linear schedule), ADM-G++'s classifier and discriminator trunk; no head released.
    "adm256": AdmConfig(adm.adm256_classifier, None, ADM_SOURCE_256, "none: no ADM-G++ head was released (train your own)"),
}


def _read_state_dict(path, source, safe_globals=()):
    """The tensors of a torch.save'd state dict, read with weights_only=True onto the CPU; safe_globals are the inert
    classes (torch.serialization.safe_globals entries) the file may hold besides tensors and plain containers."""
    path = _existing(path, source)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            state = load_weights(path)
    except UnsafeWeightsError as exc:
        raise CheckpointError(f"{exc} (the released file: {source})") from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as a torch state dict ({type(exc).__name__}: {exc}); the file may be truncated, "
            f"not written by torch.save, or hold objects other than tensors (download it again from {source})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _adm_config(config):
    """ADM_CLASSIFIERS[config], or a ValueError listing the names."""
    if config not in ADM_CLASSIFIERS:
        raise ValueError(f"ADM classifier config must be one of {sorted(ADM_CLASSIFIERS)}, got {config!r}")
    return ADM_CLASSIFIERS[config]


def load_adm_classifier(path, config, **overrides) -> adm.EncoderUNet:
    """A released ADM noise-aware classifier (config: a name in ADM_CLASSIFIERS) strictly loaded from `path`;
    `overrides` change its architecture (tiny test networks in the released format)."""
    spec = _adm_config(config)
    state = _read_state_dict(path, spec.source)
    architecture = f"the {config!r} ADM classifier ({spec.build.__name__})" + (f" with {overrides}" if overrides else "")
    return _build_and_load(lambda: spec.build(**overrides), state, path, architecture)


def load_dg_discriminator(classifier_path, head_path, classifier="cifar10", num_classes=None,
                          **overrides) -> adm.Discriminator:
    """DG's discriminator: the `classifier` feature extractor (its architecture changed by `overrides`) from
    classifier_path and a DG head from head_path (num_classes=1000 for the released conditional heads), with the
    classifier's time map."""
    spec = _adm_config(classifier)
    extractor = load_adm_classifier(classifier_path, classifier, **overrides)
    state = _read_state_dict(head_path, spec.head_source)

    def build():
        return adm.dg_head(extractor.feature_channels, num_classes)

    architecture = f"a DG head dg_head(in_channels={extractor.feature_channels}, num_classes={num_classes})"
    head = _build_and_load(build, state, head_path, architecture)
    return adm.Discriminator(extractor, head, time_map=spec.time_map).eval().requires_grad_(False)


def load_adm_unet(path, **overrides) -> unet.UNet:
    """guided-diffusion's 256x256_diffusion.pt (a plain state dict) strictly loaded into nets.unet.adm256_cond;
    `overrides` change its architecture (tiny test networks in the released format)."""
    state = _read_state_dict(path, ADM_SOURCE_256)
    architecture = "guided-diffusion's 256x256 conditional UNet (adm256_cond)" + (f" with {overrides}" if overrides else "")
    return _build_and_load(lambda: unet.adm256_cond(**overrides), state, path, architecture)


def load_dit(path, model="DiT-XL/2", input_size=32, num_classes=1000, **overrides) -> dit.DiT:
    """A released DiT (a plain state dict: DiT-XL-2-256x256.pt) strictly loaded into DIT_MODELS[model] for latents of
    input_size (image size / 8); model None builds DiT(**overrides) itself (tiny test networks)."""
    if model is not None and model not in dit.DIT_MODELS:
        raise ValueError(f"DiT model must be one of {sorted(dit.DIT_MODELS)} or None, got {model!r}")
    state = _read_state_dict(path, DIT_SOURCE)
    build = dit.DiT if model is None else dit.DIT_MODELS[model]
    kwargs = dict(input_size=input_size, num_classes=num_classes, **overrides)
    architecture = f"{model or 'DiT'}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    return _build_and_load(lambda: build(**kwargs), state, path, architecture)


SOFT_TRUNCATION_ENTRIES = ("optimizer", "model", "ema", "step")


def _ema_weights(ema, state, buffers, path):
    """`state` with its parameter entries (those not in `buffers`) replaced, in the file's order, by the EMA's
    shadow_params (upstream's ema.copy_to(model.parameters())); CheckpointError naming the file on a mismatch."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, list):
        found = f"a dict with keys {sorted(map(str, ema))}" if isinstance(ema, dict) else f"a {type(ema).__name__}"
        raise CheckpointError(f"{path}: 'ema' must be a dict with a list 'shadow_params' (Soft Truncation's "
                              f"ExponentialMovingAverage.state_dict()), found {found}")
    names = [k for k in state if k not in buffers]
    if len(shadow) != len(names):
        raise CheckpointError(f"{path}: the EMA holds {len(shadow)} shadow parameters but 'model' has {len(names)} "
                              "parameters; the EMA does not belong to this model")
    reshaped = [f"{name}: {list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__} in the EMA vs "
                f"{list(state[name].shape)} in 'model'" for name, s in zip(names, shadow)
                if not isinstance(s, torch.Tensor) or s.shape != state[name].shape]
    if reshaped:
        raise CheckpointError(f"{path}: the EMA's shadow parameters do not fit 'model' in order: "
                              f"{_key_report(reshaped, 'mismatches')}")
    return {**state, **dict(zip(names, shadow))}


def load_soft_truncation(path, key="ema", **overrides) -> ncsnpp.VPScore:
    """Soft Truncation's CelebA 64 score model from its training checkpoint {optimizer, model, ema, step}, as the VP
    score -net(x, 999 t) / sigma_vp(t): the weights `key` ("ema": the EMA that upstream samples with, "model": the raw
    ones) strictly loaded into nets.ncsnpp.celeba64(**overrides) (tiny test networks in the released format).

    'model' is the state dict of a DataParallel model (keys `module.*`, buffers included); 'ema' holds the
    shadow_params in the order of the model's parameters.
    """
    if key not in ("ema", "model"):
        raise ValueError(f"key must be 'ema' (the EMA weights) or 'model' (the raw weights), got {key!r}")
    data = _read_state_dict(path, SOFT_TRUNCATION_SOURCE)
    missing = [k for k in ("model", key) if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: a Soft Truncation checkpoint is a dict with the entries "
                              f"{list(SOFT_TRUNCATION_ENTRIES)}, found {sorted(map(str, data))}")
    if not isinstance(data["model"], dict):
        raise CheckpointError(f"{path}: 'model' holds a {type(data['model']).__name__}, not a state dict")
    state = {str(k).removeprefix("module."): v for k, v in data["model"].items()}
    net = ncsnpp.celeba64(**overrides)
    if key == "ema":
        state = _ema_weights(data["ema"], state, {name for name, _ in net.named_buffers()}, path)
    architecture = "Soft Truncation's CelebA 64 NCSN++ (nets.ncsnpp.celeba64)" + (f" with {overrides}" if overrides else "")
    return ncsnpp.VPScore(_build_and_load(lambda: net, state, path, architecture)).eval().requires_grad_(False)


LSGM_ENTRIES = ("epoch", "global_step", "args", "best_score_fid", "best_score_nll", "dae_state_dict", "vae_state_dict")

# What LSGM's checkpoint_fid.pt pickles besides tensors: its args (an argparse.Namespace of plain values) and
# best_score_fid, a numpy.float64 written by numpy 1.x (its scalar under the numpy-1 module name, its dtype, whose
# state numpy 2 sets on a Float64DType). None of them runs code when unpickled.
LSGM_GLOBALS = (argparse.Namespace, (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Float64DType)


def _lsgm_expected_args(config):
    """The values of LSGM's training args that the score model config (a dict of ncsnpp.LSGMScore arguments) fixes:
    the architecture, the time label 1000 t, the mixed prediction and the SDE the score divides by (linear VP,
    sigma2_0 = 0); "num_latent_per_group*num_groups_per_scale" is the product of the two args."""
    vp = config.get("vp", LinearVP())
    return {"dae_arch": "ncsnpp", "num_channels_dae": config["nf"], "num_scales_dae": len(config["ch_mult"]),
            "num_cell_per_scale_dae": config["num_res_blocks"], "embedding_dim": config["embedding_dim"],
            "fir": config["fir"], "embedding_type": "positional", "embedding_scale": ncsnpp.LSGM_TIME_SCALE,
            "progressive": "none", "progressive_input": "none", "mixed_prediction": True,
            "num_latent_per_group*num_groups_per_scale": config["in_channels"], "sde_type": "vpsde",
            "beta_start": vp.beta0, "beta_end": vp.beta1, "sigma2_0": 0.0}


def _check_lsgm_args(args, config, path):
    """CheckpointError naming the file and each field when the checkpoint's args (an argparse.Namespace) lack or differ
    from the values config fixes (_lsgm_expected_args)."""
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: 'args' holds a {type(args).__name__}, not LSGM's argparse.Namespace")
    found = vars(args)
    if "num_latent_per_group" in found and "num_groups_per_scale" in found:
        found = {**found, "num_latent_per_group*num_groups_per_scale":
                 found["num_latent_per_group"] * found["num_groups_per_scale"]}
    problems = []
    for name, value in _lsgm_expected_args(config).items():
        if name not in found:
            problems.append(f"{name}: absent")
        elif found[name] != value:
            problems.append(f"{name}: {found[name]!r} in the file, {value!r} here")
    if problems:
        raise CheckpointError(f"{path}: the run's args do not fit this LSGM score model "
                              f"(nets.ncsnpp.lsgm_cifar10 with {config}): " + "; ".join(problems))


def load_lsgm(path, vae_overrides=None, **overrides) -> tuple[ncsnpp.LSGMScore, nvae.NVAE]:
    """LSGM's CIFAR-10 latent score model and its VAE from a checkpoint_fid.pt-style file {epoch, global_step, args,
    best_score_fid, best_score_nll, dae_state_dict, vae_state_dict}: (the score model, dae_state_dict (EMA weights)
    strictly loaded into nets.ncsnpp.lsgm_cifar10(**overrides); the NVAE, vae_state_dict strictly loaded into
    nets.nvae.cifar10(**vae_overrides)), both frozen in eval mode. The run's args must match the configuration (_check_lsgm_args); the periodic checkpoint.pt
    (raw weights, the EMA inside the optimizer state) and the NVAE stage-1 checkpoint are refused."""
    data = _read_state_dict(path, LSGM_SOURCE, safe_globals=LSGM_GLOBALS)
    if "dae_optimizer" in data:
        raise CheckpointError(f"{path} is LSGM's periodic training checkpoint (checkpoint.pt: raw score-model weights, "
                              "their EMA inside 'dae_optimizer'); use checkpoint_fid.pt from the same folder, whose "
                              f"dae_state_dict holds the EMA weights upstream samples with (source: {LSGM_SOURCE})")
    missing = [k for k in LSGM_ENTRIES if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: an LSGM checkpoint (checkpoint_fid.pt) is a dict with the "
                              f"entries {list(LSGM_ENTRIES)}, found {sorted(map(str, data))} (the NVAE stage-1 "
                              f"checkpoint has no score model; the LSGM file: {LSGM_SOURCE})")
    for key in ("dae_state_dict", "vae_state_dict"):
        if not isinstance(data[key], dict):
            raise CheckpointError(f"{path}: {key!r} holds a {type(data[key]).__name__}, not a state dict")
    config = {**ncsnpp.LSGM_CIFAR10, **overrides}
    _check_lsgm_args(data["args"], config, path)
    architecture = ("LSGM's CIFAR-10 latent score model (nets.ncsnpp.lsgm_cifar10)"
                    + (f" with {overrides}" if overrides else ""))
    dae = _build_and_load(lambda: ncsnpp.lsgm_cifar10(**overrides), data["dae_state_dict"], path, architecture,
                          entry="dae_state_dict")
    vae_overrides = vae_overrides or {}
    vae = _build_and_load(lambda: nvae.cifar10(**vae_overrides), data["vae_state_dict"], path,
                          "LSGM's CIFAR-10 NVAE (nets.nvae.cifar10)" + (f" with {vae_overrides}" if vae_overrides else ""),
                          entry="vae_state_dict")
    return dae, vae
