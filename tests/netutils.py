"""Random weights for network tests, so that zero-initialised layers hide nothing, and released checkpoint layouts."""

import argparse
import pickle
import sys
import types
from unittest import mock

import numpy as np
import torch

from dg_lightning.score_loss import EDMLoss


def randomized(net, seed=0, scale=0.3):
    """Overwrite every parameter with N(0, scale^2) noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return net


def randomized_zeros(net, seed=0, scale=0.2):
    """Fill only the all-zero parameters (residual branch outputs) with N(0, scale^2) noise, so every branch acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return net


def write_soft_truncation_checkpoint(path, net, seed=0, scale=0.05):
    """Save `net` as Soft Truncation's run_lib does: {optimizer: an Adam state dict, model: the state dict of
    DataParallel(net) (keys `module.*`, buffers included), ema: {decay, num_updates, shadow_params: one tensor per
    parameter, in parameters() order}, step}. The shadow parameters are the weights plus N(0, scale^2) noise, so they
    differ from the model's; returns them as a list."""
    generator = torch.Generator().manual_seed(seed)
    shadow = [p.detach() + scale * torch.randn(p.shape, generator=generator) for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the Adam state (step, exp_avg, exp_avg_sq) a trained checkpoint holds
    net.zero_grad(set_to_none=True)
    torch.save(dict(optimizer=optimizer.state_dict(),
                    model={f"module.{k}": v for k, v in net.state_dict().items()},
                    ema=dict(decay=0.9999, num_updates=3, shadow_params=shadow), step=3), path)
    return shadow


NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor (numpy._core.multiarray.scalar)


class _Numpy1Pickler(pickle._Pickler):
    """torch.save's pickler writing numpy's scalar reconstructor under its numpy-1 name numpy.core.multiarray.scalar,
    as the numpy 1.x that wrote LSGM's released checkpoints did (numpy 2 names it numpy._core.multiarray.scalar)."""

    def save_global(self, obj, name=None):
        if obj is NUMPY_SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="numpy1_pickle")

# The args of LSGM's CIFAR-10 "best FID" run that fix its score model (README's vae2 + lsgm2 commands, train_vada's
# defaults), with a few of the others it holds.
LSGM_ARGS = dict(dataset="cifar10", dae_arch="ncsnpp", num_channels_dae=512, num_scales_dae=3,
                 num_cell_per_scale_dae=8, dropout=0.2, fir=True, progressive="none", progressive_input="none",
                 progressive_combine="sum", embedding_type="positional", embedding_scale=1000.0, embedding_dim=128,
                 mixing_logit_init=-3.0, mixed_prediction=True, num_latent_scales=1, num_groups_per_scale=20,
                 num_latent_per_group=9, sde_type="vpsde", beta_start=0.1, beta_end=20.0, sigma2_0=0.0, time_eps=0.01,
                 num_channels_enc=128, arch_instance="res_bnswish", use_se=True)


def write_lsgm_checkpoint(path, dae_state, vae_state, **args):
    """Save the state dicts of a score model (an LSGMScore's) and a VAE as LSGM's train_vada writes checkpoint_fid.pt:
    {epoch, global_step, args: an argparse.Namespace of LSGM_ARGS changed by `args` (None: the field left out),
    best_score_fid: a numpy.float64 pickled under numpy 1's name, best_score_nll: a tensor, dae_state_dict,
    vae_state_dict}."""
    fields = {k: v for k, v in {**LSGM_ARGS, **args}.items() if v is not None}
    content = dict(epoch=1875, global_step=731_250, args=argparse.Namespace(**fields), best_score_fid=np.float64(2.27),
                   best_score_nll=torch.tensor(3.43), dae_state_dict=dae_state, vae_state_dict=vae_state)
    torch.save(content, path, pickle_module=NUMPY1_PICKLE)


EDM_PERSISTENCE = "torch_utils.persistence"
# EDM embeds the defining module's source in every record; a loader that executed it would fail loudly.
MODULE_SRC = "raise RuntimeError('the module_src embedded in the pickle was executed')\n"


class PersistencePickler(pickle.Pickler):
    """Pickles like EDM's torch_utils.persistence (version 6): every EDM object (network modules, the loss) reduces to
    reconstruct(meta), meta = {type, version, module_src, class_name, state=its __dict__ plus _init_args and
    _init_kwargs}; ModuleDict, tensors and parameters are pickled by torch's own reductions."""

    def __init__(self, file, reconstruct, top, init_kwargs, version):
        super().__init__(file, protocol=4)
        self.reconstruct, self.top, self.init_kwargs, self.version = reconstruct, top, init_kwargs, version

    def reducer_override(self, obj):
        if not isinstance(obj, (torch.nn.Module, EDMLoss)) or isinstance(obj, torch.nn.ModuleDict):
            return NotImplemented
        # Like EDM's blocks (skip_scale=np.sqrt(0.5), ...), inner records carry numpy floats in their kwargs.
        kwargs = self.init_kwargs if obj is self.top else {
            k: np.float64(v) for k, v in vars(obj).items() if isinstance(v, float)}
        state = dict(vars(obj), _init_args=(), _init_kwargs=kwargs)
        meta = dict(type="class", version=self.version, module_src=MODULE_SRC, class_name=type(obj).__name__,
                    state=state)
        return self.reconstruct, (meta,)


def edm_persistence(record):
    """Stand-ins for EDM's modules torch_utils and torch_utils.persistence, whose _reconstruct_persistent_obj (the
    global every EDM pickle calls) appends each call's class name to the list `record`."""
    def reconstruct(meta):
        record.append(meta["class_name"])

    reconstruct.__module__, reconstruct.__qualname__ = EDM_PERSISTENCE, "_reconstruct_persistent_obj"
    persistence = types.ModuleType(EDM_PERSISTENCE)
    persistence._reconstruct_persistent_obj = reconstruct
    return {"torch_utils": types.ModuleType("torch_utils"), EDM_PERSISTENCE: persistence}


def write_edm_pickle(path, net, init_kwargs, version=6, modules=None, **entries):
    """Write an EDM network pickle {ema, loss_fn, augment_pipe, dataset_kwargs, **entries} whose 'ema' is `net`
    recorded with constructor kwargs `init_kwargs`, referencing the stand-in modules `modules` (edm_persistence's,
    fresh by default; in sys.modules only while it pickles). Returns path."""
    modules = modules or edm_persistence([])
    data = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip"))
    reconstruct = modules[EDM_PERSISTENCE]._reconstruct_persistent_obj
    with mock.patch.dict(sys.modules, modules), open(path, "wb") as file:
        PersistencePickler(file, reconstruct, net, init_kwargs, version).dump({**data, **entries})
    return path


def write_random_inception_weights(folder):
    """(path, net): torch-fidelity's FID Inception with random weights, saved under the released file's name and keys."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = folder / "empty.pth"
    torch.save({}, empty)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    weights = folder / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    return weights, net
