"""The discrete DDPM of ADM / DiT and its ancestral sampler with classifier-free, classifier and Discriminator Guidance.

Coordinates: x_k is the DDPM latent at the original timestep k in 0..T-1, already in VP coordinates,
x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) z with abar_k = prod_{j <= k} (1 - beta_j). Sampling runs on a
respaced subset of the timesteps: step i in 0..N-1 is the kept timestep k_i, and the respaced process has
beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}, so that it has the same abar at every kept step. Models and guidance get the
original k (guidance as the continuous VP time tau = k / (T - 1), the discriminator's convention).

The adaptive schedules of ADM-G++ (paper Table D.1) are small functions used by the sampler: switched_scale
(the CG scale switched at a timestep, like DiT's CFG), eds_scale (entropy-driven sampling on the CG scale),
norm_ratio_dg_weight (DG rescaled to the classifier gradient's norm) and boosted_dg_weight (DG boosted on odd steps
where the discriminator calls the sample fake). Each is off by default (plain CG + DG).
"""

import math

import torch

from dg_lightning.guidance import classifier_free_eps, shifted_mean
from dg_lightning.progress import track
from dg_lightning.solvers import solver


def linear_betas(num_timesteps=1000):
    """Ho et al.'s linear schedule, scaled to T steps: beta_k from 1e-4 * 1000 / T to 0.02 * 1000 / T (float64)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps, section_counts):
    """Sorted kept timesteps: 0..T-1 cut into len(section_counts) near-equal sections, each evenly strided.

    section_counts is a count, a list of counts or a string "250" / "10,15,20"; within a section of `size` timesteps
    starting at s, count steps are taken at s + round(j (size - 1) / (count - 1)), j = 0..count-1 (Python's round).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(count) for count in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    timesteps, start = [], 0
    for index, count in enumerate(section_counts):
        size = size_per + (1 if index < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"respacing: cannot take {count} steps from a section of {size} timesteps "
                             f"(of T = {num_timesteps}); use between 1 and {size} steps per section")
        stride, position = ((size - 1) / (count - 1) if count > 1 else 1.0), 0.0
        for _ in range(count):  # position accumulates the stride (not j * stride), as upstream, for the same rounding
            timesteps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(timesteps))


class DDPMSchedule:
    """The respaced linear-beta DDPM: float64 coefficients of the posterior q(x_{k_{i-1}} | x_{k_i}, x0) per step i."""

    def __init__(self, num_timesteps=1000, respacing="250"):
        self.num_timesteps = num_timesteps
        self.timesteps = space_timesteps(num_timesteps, respacing)
        if len(self.timesteps) < 2:
            raise ValueError(f"respacing {respacing!r} keeps {len(self.timesteps)} timestep; the sampler needs at least 2")
        kept_alphas_cumprod = torch.cumprod(1.0 - linear_betas(num_timesteps), 0)[self.timesteps]
        self.betas = 1.0 - kept_alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), kept_alphas_cumprod[:-1]])
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at step 0: its log is clipped to that of step 1.
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - self.betas).sqrt() / (1.0 - self.alphas_cumprod)

    def vp_time(self, k):
        """The continuous VP time tau = k / (T - 1) of the original timestep k (networks embed 999 tau = k)."""
        return k / (self.num_timesteps - 1)

    def predict_x0(self, x, i, eps, clip=False):
        """x0 = (x_k - sqrt(1 - abar) eps) / sqrt(abar) at step i, optionally clipped to [-1, 1] (pixels; off for latents)."""
        abar = float(self.alphas_cumprod[i])
        x0 = math.sqrt(1.0 / abar) * x - math.sqrt(1.0 / abar - 1.0) * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def posterior_mean(self, x0, x, i):
        """Mean of q(x_{k_{i-1}} | x_{k_i}, x0): coef1 x0 + coef2 x_k."""
        return float(self.posterior_mean_coef1[i]) * x0 + float(self.posterior_mean_coef2[i]) * x

    def learned_log_variance(self, v, i):
        """Learned-range log variance: v in [-1, 1] interpolates log(clipped posterior variance) .. log(beta_i)."""
        frac = (v + 1.0) / 2.0
        return frac * math.log(float(self.betas[i])) + (1.0 - frac) * float(self.posterior_log_variance_clipped[i])

    def p_mean_variance(self, eps, v, x, i, clip=False):
        """(mean, log variance, x0) of the model's p(x_{k_{i-1}} | x_{k_i}) from its eps and variance output v."""
        x0 = self.predict_x0(x, i, eps, clip)
        return self.posterior_mean(x0, x, i), self.learned_log_variance(v, i), x0


def switched_scale(k, scale, scale_late, switch_step):
    """The guidance scale at the original timestep k: `scale` while k > switch_step, `scale_late` for k <= switch_step."""
    return scale if k > switch_step else scale_late


def eds_scale(scale, logits):
    """Entropy-driven sampling (EDS, Zheng et al. 2022): the per-sample classifier-guidance scale (B,)
    scale * log(C) / H(p(. | x_k)), H the entropy of the classifier's softmax over its C classes; an uncertain
    prediction (H = log C) keeps the scale, a confident one raises it. H is floored at float32's eps (a one-hot
    prediction would divide by zero)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return scale * math.log(logits.shape[-1]) / entropy.clamp_min(torch.finfo(torch.float32).eps)


def norm_ratio_dg_weight(weight, grad_dg, grad_cg):
    """The DG weight balanced against classifier guidance (Table D.1 (d-2)), per sample (B,):
    weight * ||grad_cg|| / ||grad_dg|| (Euclidean norms over each sample's coordinates), so the DG term
    weight' grad_dg has the norm weight * ||grad_cg||; 0 where grad_dg = 0 (outside DG's window)."""
    norm_dg, norm_cg = grad_dg.flatten(1).norm(dim=1), grad_cg.flatten(1).norm(dim=1)
    return torch.where(norm_dg > 0, weight * norm_cg / norm_dg, torch.zeros_like(norm_dg))


def boosted_dg_weight(weight, log_ratio, step, boost):
    """The DG weight per sample (B,) with the Table D.1 (d-2) boost: multiplied by `boost` (1 / 0.75 in the paper) on
    odd sampler steps (step counted from 0 at the first, noisiest step) for the samples whose log ratio
    log(d / (1 - d)) < 0 (those the discriminator calls fake); unchanged elsewhere."""
    weight = torch.as_tensor(weight, dtype=log_ratio.dtype, device=log_ratio.device).expand_as(log_ratio)
    if step % 2 == 0:
        return weight
    return torch.where(log_ratio < 0, boost * weight, weight)


def _broadcast_weight(weight, x):
    """A per-sample weight (B,) shaped (B, 1, ..., 1) in x's dtype, to broadcast over x; a float weight as it is."""
    return weight.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype) if torch.is_tensor(weight) else weight


@solver("ddpm", score="eps")
def ddpm_sampler(
    model_fn,
    latents,
    class_labels=None,
    schedule=None,
    null_label=None,
    cfg_scale=1.0,
    cfg_scale_late=None,
    cfg_switch_step=200,
    guided_channels=3,
    dg=None,
    dg_weight=0.0,
    dg_switch_step=0,
    classifier=None,
    cg_scale=0.0,
    cg_scale_late=None,
    cg_switch_step=0,
    eds=False,
    dg_boost=1.0,
    dg_norm_ratio=False,
    clip_denoised=False,
    randn_like=torch.randn_like,
    dtype=torch.float32,
    progress=False,
):
    """Ancestral sampling x_{k_{N-1}} = z -> x0 of the respaced DDPM (default: T = 1000, 250 steps), in VP coordinates.

    model_fn(x, t, y) -> [B, 2C, ...]: eps (channels < C) and learned-range v, t the original timestep k as floats.
    Per step i (k = k_i):
      eps = eps_u + s(k) (eps_c - eps_u) on the first guided_channels channels, the model run once on [x; x] with
            labels [y; null_label]; s(k) = cfg_scale while k > cfg_switch_step, cfg_scale_late after; v and the
            other channels come from the conditional half. Off (one pass on y) when both scales are 1.
      mu, Sigma = p_mean_variance(eps, v); mu' = mu + Sigma (w_DG grad log(d / (1 - d)) + w_CG grad log p(y | x_k))
            at tau = k / (T - 1), DG only while k > dg_switch_step (and inside dg's own window);
      x_{k_{i-1}} = mu' + sqrt(Sigma) n, with no noise at the last step.
    dg and classifier are GradientGuidance objects (evaluated in VP coordinates). DiT-G++ uses cfg 1.25 / 3.0
    switched at 200, DG weight 1 above dg_switch_step = 100.
    ADM-G++'s adaptive schedules (Table D.1), each off by default:
      w_CG = switched_scale(k, cg_scale, cg_scale_late, cg_switch_step) (0.75 while k > 650, 1.5 after), times
             eds_scale per sample when eds (from the logits of the classifier-guidance forward);
      w_DG = dg_weight, times ||grad log p(y | x_k)|| / ||grad log(d / (1 - d))|| per sample when dg_norm_ratio,
             times dg_boost on odd steps where log(d / (1 - d)) < 0 (boosted_dg_weight; 1 / 0.75 in the paper).
    """
    schedule = DDPMSchedule() if schedule is None else schedule
    cfg_scale_late = cfg_scale if cfg_scale_late is None else cfg_scale_late
    use_cfg = cfg_scale != 1.0 or cfg_scale_late != 1.0
    channels = latents.shape[1]
    if use_cfg and (class_labels is None or null_label is None):
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs class_labels and null_label (the model's "
                         "null class, e.g. num_classes = 1000 for DiT); set both or use cfg_scale = cfg_scale_late = 1")
    if use_cfg and guided_channels is not None and not 1 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be in 1..{channels} (the latent channels) or None, got {guided_channels}")
    if dg_weight != 0.0 and dg is None:
        raise ValueError(f"dg_weight = {dg_weight} needs a discriminator guidance object dg; pass dg or set dg_weight = 0")
    cg_scale_late = cg_scale if cg_scale_late is None else cg_scale_late
    if (cg_scale != 0.0 or cg_scale_late != 0.0 or eds or dg_norm_ratio) and classifier is None:
        raise ValueError(f"classifier guidance (cg_scale = {cg_scale}, cg_scale_late = {cg_scale_late}, eds = {eds}) or "
                         f"dg_norm_ratio = {dg_norm_ratio} needs a classifier guidance object; pass classifier or turn "
                         "them off (scales 0, eds and dg_norm_ratio False)")
    if dg_boost <= 0:
        raise ValueError(f"dg_boost must be > 0 (1: no boost; the paper's ADM-G++ uses 1 / 0.75), got {dg_boost}")
    batch, device = latents.shape[0], latents.device
    labels_cfg = torch.cat([class_labels, torch.full_like(class_labels, null_label)]) if use_cfg else None

    x = latents.to(dtype)
    for i in track(range(len(schedule.timesteps) - 1, -1, -1), "DDPM sampling", enabled=progress):
        k = schedule.timesteps[i]
        t = torch.full((batch,), float(k), dtype=torch.float32, device=device)
        if use_cfg:
            out_cond, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), labels_cfg).to(dtype).chunk(2)
            scale = switched_scale(k, cfg_scale, cfg_scale_late, cfg_switch_step)
            eps = classifier_free_eps(out_cond[:, :channels], out_uncond[:, :channels], scale, guided_channels)
        else:
            out_cond = model_fn(x, t, class_labels).to(dtype)
            eps = out_cond[:, :channels]
        if out_cond.shape[1] != 2 * channels:
            raise ValueError(f"ddpm_sampler needs a learned-sigma model output of 2 x {channels} channels (eps, v), "
                             f"got {out_cond.shape[1]}; build the network with learn_sigma=True")
        mean, log_variance, _ = schedule.p_mean_variance(eps, out_cond[:, channels:], x, i, clip_denoised)

        tau = schedule.vp_time(k)  # one host float: the guidance window is decided without a device sync
        step = len(schedule.timesteps) - 1 - i  # 0 at the first (noisiest) step
        grads_and_weights, grad_cg = [], None
        cg_weight = switched_scale(k, cg_scale, cg_scale_late, cg_switch_step)
        dg_on = dg_weight != 0.0 and k > dg_switch_step
        if classifier is not None and (cg_weight != 0.0 or (dg_norm_ratio and dg_on)):  # the norm ratio needs grad_cg
            _, grad_cg, logits = classifier.vp_coordinates(x, tau, class_labels, with_aux=True)
            if eds and logits is not None:  # the logits of the forward that gave grad_cg (None outside CG's window)
                cg_weight = eds_scale(cg_weight, logits)
            grads_and_weights.append((grad_cg, _broadcast_weight(cg_weight, x)))
        if dg_on:
            log_ratio, grad_dg = dg.vp_coordinates(x, tau, class_labels)
            weight = norm_ratio_dg_weight(dg_weight, grad_dg, grad_cg) if dg_norm_ratio else dg_weight
            if dg_boost != 1.0:
                weight = boosted_dg_weight(weight, log_ratio, step, dg_boost)
            grads_and_weights.append((grad_dg, _broadcast_weight(weight, x)))
        if grads_and_weights:
            mean = shifted_mean(mean, torch.exp(log_variance), grads_and_weights)

        x = mean + torch.exp(0.5 * log_variance) * randn_like(x) if i > 0 else mean
    return x


@solver("ddim", score="eps")
def ddim_sampler(
    model_fn,
    latents,
    class_labels=None,
    schedule=None,
    eta=0.0,
    dg=None,
    dg_weight=0.0,
    dg_switch_step=0,
    clip_denoised=False,
    randn_like=torch.randn_like,
    dtype=torch.float32,
    progress=False,
):
    """DDIM (Song et al. 2021) on the respaced DDPM, x_{k_{N-1}} = z -> x0, with Discriminator Guidance on eps.

    model_fn(x, t, y) -> [B, C or 2C, ...] with eps in the first C channels (a learned variance is ignored), t the
    original timestep k. DG adds w grad log(d / (1 - d)) to the score -eps / sqrt(1 - abar), so per step i (k = k_i)
      eps' = eps - w sqrt(1 - abar_i) grad log(d / (1 - d))   at tau = k / (T - 1), while k > dg_switch_step;
      x0 = (x - sqrt(1 - abar_i) eps') / sqrt(abar_i)  (clipped to [-1, 1] when clip_denoised);
      x_{k_{i-1}} = sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1} - s^2) eps' + s n,
      s = eta sqrt((1 - abar_{i-1}) / (1 - abar_i)) sqrt(1 - abar_i / abar_{i-1}) (eta = 0: deterministic).
    """
    schedule = DDPMSchedule() if schedule is None else schedule
    if dg_weight != 0.0 and dg is None:
        raise ValueError(f"dg_weight = {dg_weight} needs a discriminator guidance object dg; pass dg or set dg_weight = 0")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    batch, channels = latents.shape[0], latents.shape[1]
    x = latents.to(dtype)
    for i in track(range(len(schedule.timesteps) - 1, -1, -1), "DDIM sampling", enabled=progress):
        k = schedule.timesteps[i]
        abar, abar_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        t = torch.full((batch,), float(k), dtype=torch.float32, device=x.device)
        eps = model_fn(x, t, class_labels).to(dtype)[:, :channels]
        if dg_weight != 0.0 and k > dg_switch_step:
            eps = eps - dg_weight * math.sqrt(1.0 - abar) * dg.vp_coordinates(x, schedule.vp_time(k), class_labels)[1]
        x0 = schedule.predict_x0(x, i, eps, clip_denoised)
        if i == 0:
            return x0
        s = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev - s**2) * eps
        if s > 0:
            x = x + s * randn_like(x)
    return x
