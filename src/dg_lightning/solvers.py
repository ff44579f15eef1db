"""The samplers' registry: `sampler.solver` names a sampler function and the kind of score model it integrates.

Every sampler has one calling convention (k-diffusion's idea):
    sample(score_model, latents, class_labels=None, dg=None, dg_weight=0.0, <other dg_* settings>,
           randn_like=torch.randn_like, progress=False, **settings) -> samples
with `dg` a guidance.DiscriminatorGuidance (its window and clipping) and each dg_<name> the setting guidance.dg.<name>;
`settings` are the keys of the sampler's config file. A sampler is added by decorating its function with
@solver(name, score=kind) and writing conf/sampler/<file>.yaml with `solver: name` and its settings.
"""

from dataclasses import dataclass, field
from typing import Callable

SCORE_KINDS = {
    "denoiser": "EDM's denoiser D(x; sigma, y) in EDM coordinates",
    "eps": "DDPM's noise prediction with learned variance, model(x_k, k, y) -> (eps, v), in VP coordinates",
    "vp_score": "a continuous-time score model on LVP time, model(x_vp, t, y) -> grad log p_t(x_vp) (score_sde's score)",
}


@dataclass(frozen=True)
class Solver:
    """A registered sampler: its function, the score kind it takes (SCORE_KINDS) and fixed keyword arguments."""

    sample: Callable
    score: str
    fixed: dict = field(default_factory=dict)


SOLVERS: dict[str, Solver] = {}


def solver(name, score, **fixed):
    """Register the decorated sampler function as sampler.solver=name, for score models of kind `score`."""
    if score not in SCORE_KINDS:
        raise ValueError(f"solver {name!r}: score kind must be one of {sorted(SCORE_KINDS)}, got {score!r}")

    def register(sample):
        SOLVERS[name] = Solver(sample, score, fixed)
        return sample

    return register
