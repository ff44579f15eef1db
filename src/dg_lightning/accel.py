"""The GPU fast path for the networks: bf16 autocast, channels_last, torch.compile.

Only how the networks run changes, never what the samplers compute: the sampler state (x, slopes, the
DG correction) stays float32, and every wrapped network returns float32. `Accel()` (the default)
is the plain float32 path; `Accel.gpu()` is the fast path measured in bench/.
"""

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
ATTENTION_BACKENDS = {None: None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class Accel:
    """How networks run: autocast dtype (None | bf16 | fp16), channels_last, torch.compile mode (None: eager), TF32,
    cuDNN autotuning of the convolution algorithms for the fixed shapes of sampling and training, the
    scaled_dot_product_attention backend (None: PyTorch's choice)."""

    autocast: str | None = None
    channels_last: bool = False
    compile: str | None = None
    tf32: bool = False
    cudnn_benchmark: bool = False
    attention: str | None = None

    def __post_init__(self):
        for key, allowed in (("autocast", AUTOCAST_DTYPES), ("compile", COMPILE_MODES),
                             ("attention", ATTENTION_BACKENDS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"accel.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")

    @property
    def is_plain(self):
        """True for the plain float32 eager path (TF32 and cuDNN autotuning aside: process-wide, see set_backends)."""
        return self.autocast is None and not self.channels_last and self.compile is None and self.attention is None

    @classmethod
    def gpu(cls, compile="default"):
        """The fast path: bf16 autocast, channels_last, compiled kernels, TF32 for what stays float32, cuDNN autotuning."""
        return cls(autocast="bf16", channels_last=True, compile=compile, tf32=True, cudnn_benchmark=True)


def set_backends(accel: Accel):
    """Apply accel's process-wide switches: TF32 tensor cores for float32 matmuls and convolutions, and cuDNN
    autotuning (torch.backends.cudnn.benchmark: time the algorithms once per shape, keep the fastest)."""
    torch.backends.cuda.matmul.allow_tf32 = accel.tf32
    torch.backends.cudnn.allow_tf32 = accel.tf32
    torch.backends.cudnn.benchmark = accel.cudnn_benchmark


def autocast(device_type: str, accel: Accel):
    """The autocast context of `accel` on this device type (a null context for the float32 path)."""
    dtype = AUTOCAST_DTYPES[accel.autocast]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def attention_backend(accel: Accel):
    """The context that restricts scaled_dot_product_attention to accel.attention's backend (a null context for None)."""
    backend = ATTENTION_BACKENDS[accel.attention]
    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def prepare(net: torch.nn.Module, accel: Accel):
    """net made ready in place for `accel`: channels_last weights, and a torch.compile'd forward (static shapes).

    Compiling in place (nn.Module.compile) keeps the state dict's names, so checkpoints do not change; a net that is
    already compiled (e.g. the discriminator in training, used for guidance by the sampling callback) is not recompiled.
    """
    if accel.channels_last:
        net.to(memory_format=torch.channels_last)
    if accel.compile is not None and not is_compiled(net):
        net.compile(mode=compile_mode(accel.compile), dynamic=False)
    return net


def is_compiled(net: torch.nn.Module):
    """True when net.compile() has been called on this module (its forward runs through torch.compile)."""
    return getattr(net, "_compiled_call_impl", None) is not None


def compile_mode(name: str):
    """torch.compile's mode argument for one of COMPILE_MODES ("default" is torch's None)."""
    return None if name == "default" else name


def run(net, accel: Accel, x, *args, **kwargs):
    """net(x, *args) under autocast and the attention backend, with a 4-D input x in channels_last; a floating output
    returned as float32."""
    if accel.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device.type, accel), attention_backend(accel):
        out = net(x, *args, **kwargs)
    return out.float() if out.is_floating_point() else out


class Accelerated(torch.nn.Module):
    """A network run as `accel` says (see `run`), with the network's call signature and attributes (e.g. an EDM
    network's sigma_min, sigma_max and round_sigma, which the EDM sampler reads)."""

    def __init__(self, net: torch.nn.Module, accel: Accel):
        super().__init__()
        self.net, self.accel = prepare(net, accel), accel

    def forward(self, x, *args, **kwargs):
        return run(self.net, self.accel, x, *args, **kwargs)

    def __getattr__(self, name):
        """An attribute of this module, else of the wrapped network."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "net":  # not set yet
                raise
            return getattr(self.net, name)


def accelerate(net: torch.nn.Module, accel: Accel):
    """net wrapped to run as `accel` says; the plain float32 path returns net itself."""
    return net if accel.is_plain else Accelerated(net, accel)



def build_accel(node=None):
    """The Accel of a config node (cfg.accel; None: the plain float32 path), with its process-wide switches applied."""
    accel = Accel(**OmegaConf.to_container(node, resolve=True)) if node else Accel()
    set_backends(accel)
    return accel
