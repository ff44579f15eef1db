"""Discrete DDPM: closed forms of the schedule, the Gaussian limit of the sampler, CFG switching, DG and CG mean shifts."""

import math

import pytest
import torch

from dg_lightning import ddpm
from dg_lightning.seeds import SampleNoise
from dg_lightning.guidance import ClassifierGuidance, DiscriminatorGuidance


def original_alphas_cumprod(num_timesteps=1000):
    """abar_k = prod_{j <= k} (1 - beta_j), beta_j = 1e-4 + (0.02 - 1e-4) j / (T - 1), term by term."""
    betas = [1e-4 + (0.02 - 1e-4) * j / (num_timesteps - 1) for j in range(num_timesteps)]
    abar, out = 1.0, []
    for beta in betas:
        abar *= 1.0 - beta
        out.append(abar)
    return torch.tensor(out, dtype=torch.float64)


def test_linear_schedule_alphas_cumprod():
    betas = ddpm.linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(ddpm.DDPMSchedule(1000, "1000").alphas_cumprod, original_alphas_cumprod(), rtol=1e-12, atol=0)
    # guided-diffusion's schedule: abar_100 = 0.8951, abar_500 = 0.0778, abar_999 = 4.04e-5
    abar = original_alphas_cumprod()
    assert [round(abar[k].item(), 4) for k in (100, 500)] == [0.8951, 0.0778] and abar[999].item() == pytest.approx(4.04e-5, rel=2e-3)
    torch.testing.assert_close(ddpm.linear_betas(250), 4 * torch.linspace(1e-4, 0.02, 250, dtype=torch.float64))


def test_space_timesteps():
    steps = ddpm.space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[:5] == [0, 4, 8, 12, 16] and steps[-2:] == [995, 999]
    assert ddpm.space_timesteps(300, "10,15,20")[:11] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100]
    assert len(ddpm.space_timesteps(300, [10, 15, 20])) == 45 and ddpm.space_timesteps(1000, 1000) == list(range(1000))
    assert ddpm.space_timesteps(1000, "1,1") == [0, 500]
    with pytest.raises(ValueError, match="cannot take 600 steps from a section of 500"):
        ddpm.space_timesteps(1000, "600,1")


def test_respaced_betas_keep_alphas_cumprod_at_the_kept_steps():
    schedule = ddpm.DDPMSchedule(1000, "250")
    abar = original_alphas_cumprod()[schedule.timesteps]
    torch.testing.assert_close(schedule.alphas_cumprod, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.betas[1:], 1 - abar[1:] / abar[:-1], rtol=1e-12, atol=0)
    assert schedule.betas[0].item() == pytest.approx(1 - abar[0].item(), rel=1e-12)


def test_posterior_is_the_gaussian_conditional():
    """q(x' | x, x0) from Bayes: 1 / var = 1 / (1 - abar') + (1 - beta) / beta; mean = var (sqrt(abar') x0 / (1 - abar') + sqrt(1 - beta) x / beta)."""
    s = ddpm.DDPMSchedule(1000, "25")
    abar_prev, beta = s.alphas_cumprod_prev[1:], s.betas[1:]
    var = 1.0 / (1.0 / (1.0 - abar_prev) + (1.0 - beta) / beta)
    torch.testing.assert_close(s.posterior_variance[1:], var, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1[1:], var * abar_prev.sqrt() / (1.0 - abar_prev), rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[1:], var * (1.0 - beta).sqrt() / beta, rtol=1e-10, atol=0)
    assert s.posterior_variance[0].item() == 0.0 and s.posterior_mean_coef1[0].item() == pytest.approx(1.0)


def test_learned_range_limits_and_x0_prediction():
    s = ddpm.DDPMSchedule(1000, "25")
    ones = torch.ones(3)
    for i in (0, 1, 12, 24):
        min_log = math.log(s.posterior_variance[max(i, 1)].item())  # the clipped log posterior variance
        torch.testing.assert_close(s.learned_log_variance(ones, i), ones * math.log(s.betas[i].item()))
        torch.testing.assert_close(s.learned_log_variance(-ones, i), ones * min_log)
        torch.testing.assert_close(s.learned_log_variance(0 * ones, i), ones * 0.5 * (min_log + math.log(s.betas[i].item())))
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    abar = s.alphas_cumprod[10].item()
    x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(s.predict_x0(x, 10, eps), x0, atol=1e-5, rtol=1e-5)
    assert s.predict_x0(x, 10, eps, clip=True).abs().max() <= 1.0
    assert s.vp_time(999) == 1.0 and s.vp_time(500) == pytest.approx(500 / 999)


def gaussian_data_model(schedule, mean, std):
    """The exact (eps, v) of data x0 ~ N(mean, std^2): E[eps | x_k] and the learned-range v of the true reverse variance."""
    abar_all = original_alphas_cumprod()
    index = {k: i for i, k in enumerate(schedule.timesteps)}

    def model_fn(x, t, y):
        k = int(t[0])
        i, abar = index[k], abar_all[k].item()
        marginal_var = abar * std**2 + 1 - abar
        eps = math.sqrt(1 - abar) * (x - math.sqrt(abar) * mean) / marginal_var
        if i == 0:
            return torch.cat([eps, torch.zeros_like(x)], 1)
        abar_prev = abar_all[schedule.timesteps[i - 1]].item()
        beta = 1 - abar / abar_prev
        posterior_var = beta * (1 - abar_prev) / (1 - abar)
        coef1 = math.sqrt(abar_prev) * beta / (1 - abar)
        reverse_var = posterior_var + coef1**2 * std**2 * (1 - abar) / marginal_var  # Var[x_prev | x_k]
        v = 2 * (reverse_var.log() - math.log(posterior_var)) / (math.log(beta) - math.log(posterior_var)) - 1
        return torch.cat([eps, v.expand_as(x)], 1)

    return model_fn


def test_sampler_reproduces_a_gaussian_data_distribution():
    """Exact eps and reverse variance: every step is the exact reverse kernel, so x0 ~ N(m, s^2 - Var[x0 | x_{k=0}])."""
    schedule = ddpm.DDPMSchedule(1000, "250")
    mean, std = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.5, 0.2]])
    n, generator = 100_000, torch.Generator().manual_seed(0)
    abar_top, abar_0 = (original_alphas_cumprod()[k].item() for k in (999, 0))
    latents = math.sqrt(abar_top) * mean + (abar_top * std**2 + 1 - abar_top).sqrt() * torch.randn(n, 2, generator=generator)
    x0 = ddpm.ddpm_sampler(gaussian_data_model(schedule, mean, std), latents, schedule=schedule,
                           randn_like=lambda x: torch.randn(x.shape, generator=generator))
    expected_var = std**2 - std**2 * (1 - abar_0) / (abar_0 * std**2 + 1 - abar_0)
    torch.testing.assert_close(x0.mean(0, keepdim=True), mean, atol=5 * std.max().item() / math.sqrt(n), rtol=0)
    torch.testing.assert_close(x0.var(0, keepdim=True), expected_var, rtol=5 * math.sqrt(2 / n), atol=0)


def toy_cfg_model(x, t, y):
    """A nonlinear learned-sigma model whose output depends on x, t and the label (null label 7)."""
    label = y.float().view(-1, 1, 1, 1)
    eps = torch.tanh(x * (1 + 0.1 * label)) * (1 - t.view(-1, 1, 1, 1) / 2000) + 0.05 * label
    v = torch.sin(x + 0.01 * label)
    return torch.cat([eps, v], 1)


def test_cfg_is_the_switched_eps_combination_on_three_channels(monkeypatch):
    schedule = ddpm.DDPMSchedule(1000, "250")
    latents, labels = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 5])

    def effective_model(x, t, y):
        """What CFG should amount to: s(k) = 1.25 while k > 200, else 3.0; channel 3 and v from the conditional pass."""
        out_c, out_u = toy_cfg_model(x, t, y), toy_cfg_model(x, t, torch.full_like(y, 7))
        scale = 1.25 if t[0] > 200 else 3.0
        return torch.cat([out_u[:, :3] + scale * (out_c[:, :3] - out_u[:, :3]), out_c[:, 3:]], 1)

    def run(model_fn, **kwargs):
        generator = torch.Generator().manual_seed(1)
        return ddpm.ddpm_sampler(model_fn, latents, labels, schedule, randn_like=lambda x: torch.randn(x.shape, generator=generator), **kwargs)

    scales = []
    real_cfg = ddpm.classifier_free_eps
    monkeypatch.setattr(ddpm, "classifier_free_eps", lambda c, u, scale, ch: scales.append(scale) or real_cfg(c, u, scale, ch))
    guided = run(toy_cfg_model, null_label=7, cfg_scale=1.25, cfg_scale_late=3.0, cfg_switch_step=200)
    assert scales == [1.25] * 200 + [3.0] * 50  # 250 steps: k = 999 .. 203 above the switch, 199 .. 0 below
    torch.testing.assert_close(guided, run(effective_model), rtol=1e-5, atol=1e-5)
    assert (guided - run(toy_cfg_model)).abs().max() > 1e-2  # guidance changed the samples


def linear_schedule_two_steps():
    """Kept timesteps {0, 500}: step 1 at k = 500 (tau = 500 / 999), then the last step at k = 0."""
    return ddpm.DDPMSchedule(1000, "1,1")


def test_dg_and_cg_shift_the_mean_by_sigma_times_weighted_gradients():
    schedule = linear_schedule_two_steps()
    abar = original_alphas_cumprod()
    beta = 1 - abar[500].item() / abar[0].item()
    variance = math.sqrt(beta * beta * (1 - abar[0].item()) / (1 - abar[500].item()))  # Sigma_t at v = 0: sqrt(beta * posterior var)
    center, weights = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1), torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    latents, labels = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 3])
    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(4))

    def quadratic_log_ratio(x_vp, tau, y):  # log(d / (1 - d)) = -tau |x - c|^2 / 2: grad = -tau (x - c)
        return -0.5 * (tau.view(-1, 1, 1, 1) * (x_vp - center) ** 2).flatten(1).sum(1)

    def classifier(x_vp, tau):
        return x_vp.flatten(1) @ weights

    def run(**kwargs):
        zero_model = lambda x, t, y: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # eps = 0, v = 0
        return ddpm.ddpm_sampler(zero_model, latents, labels, schedule, randn_like=lambda x: noise, **kwargs)

    # Both windows hold tau = 500 / 999 only (not the last step's tau = 0), so each shift is added once, at k = 500.
    dg, cg = DiscriminatorGuidance(quadratic_log_ratio, t_min=0.0), ClassifierGuidance(classifier, t_min=0.1)
    plain = run()
    grad_dg = -(500 / 999) * (latents - center)
    probs = torch.softmax(latents.flatten(1) @ weights, 1)
    grad_cg = (weights.T[labels] - probs @ weights.T).view_as(latents)  # grad log softmax[y] of a linear classifier
    # The last step (k = 0) maps x to x / sqrt(abar_0) (coef1 = 1, eps = 0), so the step-1 shift arrives scaled by that.
    last = 1 / math.sqrt(abar[0].item())
    torch.testing.assert_close(run(dg=dg, dg_weight=1.5) - plain, last * variance * 1.5 * grad_dg, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run(dg=dg, dg_weight=1.5, classifier=cg, cg_scale=0.75) - plain,
                               last * variance * (1.5 * grad_dg + 0.75 * grad_cg), atol=1e-6, rtol=1e-5)
    assert torch.equal(run(dg=dg, dg_weight=1.5, dg_switch_step=500), plain)  # DG only while k > dg_switch_step


def test_noise_is_per_sample_and_absent_at_the_last_step():
    schedule = ddpm.DDPMSchedule(1000, "10")
    calls = []

    def counting_randn_like(x):
        calls.append(x.shape)
        return torch.randn_like(x)

    ddpm.ddpm_sampler(toy_cfg_model, torch.randn(2, 4, 2, 2), torch.tensor([1, 2]), schedule, randn_like=counting_randn_like)
    assert len(calls) == 9  # 10 steps, no noise at the last

    latents, labels = torch.randn(3, 4, 2, 2), torch.tensor([1, 2, 3])
    both = ddpm.ddpm_sampler(toy_cfg_model, latents, labels, schedule, null_label=7, cfg_scale=2.0,
                             randn_like=SampleNoise([10, 11, 12]).randn_like)
    alone = ddpm.ddpm_sampler(toy_cfg_model, latents[1:2], labels[1:2], schedule, null_label=7, cfg_scale=2.0,
                              randn_like=SampleNoise([11]).randn_like)
    torch.testing.assert_close(both[1:2], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"cfg_scale": 1.5}, "null_label"),
    ({"cfg_scale": 1.5, "null_label": 7, "guided_channels": 5}, "guided_channels must be in 1..4"),
    ({"dg_weight": 1.0}, "needs a discriminator guidance object"),
    ({"cg_scale": 1.0}, "needs a classifier guidance object"),
])
def test_bad_settings_fail_before_any_model_call(kwargs, match):
    def model_fn(x, t, y):
        raise AssertionError("the model must not run")

    with pytest.raises(ValueError, match=match):
        ddpm.ddpm_sampler(model_fn, torch.zeros(1, 4, 2, 2), torch.tensor([1]), **kwargs)


def test_model_without_learned_sigma_is_named():
    with pytest.raises(ValueError, match="learn_sigma=True"):
        ddpm.ddpm_sampler(lambda x, t, y: x, torch.zeros(1, 4, 2, 2), schedule=ddpm.DDPMSchedule(1000, "5"))


# --- ADM-G++'s adaptive schedules (paper Table D.1) ---

def linear_classifier(weights):
    """A noise-blind linear classifier logits = x_vp.flatten(1) @ weights, and its ClassifierGuidance."""
    classifier = lambda x_vp, tau: x_vp.flatten(1) @ weights
    return ClassifierGuidance(classifier)


def test_cg_scale_switches_at_exactly_k_650(monkeypatch):
    assert ddpm.switched_scale(651, 0.75, 1.5, 650) == 0.75 and ddpm.switched_scale(650, 0.75, 1.5, 650) == 1.5
    schedule = ddpm.DDPMSchedule(1000, "1000")
    weights = []
    real_shift = ddpm.shifted_mean
    monkeypatch.setattr(ddpm, "shifted_mean", lambda mean, var, gw: weights.append(gw[0][1]) or real_shift(mean, var, gw))
    zero_model = lambda x, t, y: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    cg = linear_classifier(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)))
    ddpm.ddpm_sampler(zero_model, torch.randn(2, 3, 2, 2), torch.tensor([1, 4]), schedule, classifier=cg,
                      cg_scale=0.75, cg_scale_late=1.5, cg_switch_step=650)
    assert weights == [0.75] * 349 + [1.5] * 651  # k = 999 .. 651, then 650 .. 0


def test_eds_scale_is_scale_times_log_classes_over_the_entropy():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125], [1.0, 0.0, 0.0, 0.0]])
    entropy = torch.tensor([math.log(4), 1.75 * math.log(2), 0.0])  # -sum p log p in closed form
    scale = ddpm.eds_scale(0.75, probs.log())
    torch.testing.assert_close(scale[:2], 0.75 * math.log(4) / entropy[:2])
    assert scale[0].item() == pytest.approx(0.75)  # a uniform prediction keeps the scale
    assert torch.isfinite(scale[2]) and scale[2] > 1e5  # a one-hot prediction: large but finite
    torch.testing.assert_close(ddpm.eds_scale(0.75, probs[:2].log() + 3.0), scale[:2])  # logits up to a constant


def test_norm_ratio_gives_the_dg_term_the_classifier_gradients_norm():
    generator = torch.Generator().manual_seed(0)
    grad_dg, grad_cg = torch.randn(4, 3, 2, 2, generator=generator), torch.randn(4, 3, 2, 2, generator=generator)
    grad_dg[3] = 0.0  # outside DG's window
    weight = ddpm.norm_ratio_dg_weight(1.5, grad_dg, grad_cg)
    dg_norms = (weight.view(-1, 1, 1, 1) * grad_dg).flatten(1).norm(dim=1)
    torch.testing.assert_close(dg_norms[:3], 1.5 * grad_cg[:3].flatten(1).norm(dim=1))
    assert weight[3].item() == 0.0
    torch.testing.assert_close(ddpm.norm_ratio_dg_weight(1.5, 7.0 * grad_dg, grad_cg)[:3], weight[:3] / 7.0)


def test_dg_boost_only_on_odd_steps_and_only_where_the_log_ratio_is_negative():
    log_ratio = torch.tensor([-2.0, -1e-6, 0.0, 3.0, float("inf")])  # inf: outside DG's window
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for step in (0, 2, 248):
        assert torch.equal(ddpm.boosted_dg_weight(weight, log_ratio, step, 1 / 0.75), weight)
    for step in (1, 3, 249):
        expected = torch.tensor([1.0 / 0.75, 2.0 / 0.75, 3.0, 4.0, 5.0])
        torch.testing.assert_close(ddpm.boosted_dg_weight(weight, log_ratio, step, 1 / 0.75), expected)
    assert torch.equal(ddpm.boosted_dg_weight(1.0, log_ratio, 1, 3.0), torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0]))


def test_adm_g_plus_plus_steps_combine_the_schedules():
    """The sampler with every schedule on, against the same steps written out: zero model (eps = 0, v = 0), a linear
    classifier and a linear log ratio whose sign differs between samples; 3 steps k = 667 (step 0), 334 (step 1, odd:
    boosted), 0 (no DG: k = dg_switch_step)."""
    schedule = ddpm.DDPMSchedule(1000, "1,1,1")
    assert schedule.timesteps == [0, 334, 667]
    generator = torch.Generator().manual_seed(5)
    # A classifier that stays far from one-hot: EDS scales CG by log(C) / H, so with H near 0 (it reached 0.002 with
    # weights of scale 0.3) the kick is ~1000x the gradient and float32's rounding of the logits and of H (~1e-5
    # relative there) reaches the output at this test's tolerance; which side of it depended on the CPU's matrix
    # kernels. At scale 0.05 (H >= 0.6) a 1e-7 relative change of the weights moves the output by under 1% of the
    # tolerance (measured), against 22% at 0.3.
    cg_weights = 0.05 * torch.randn(12, 6, generator=generator)
    dg_direction = 0.3 * torch.randn(1, 3, 2, 2, generator=generator)
    latents, labels = torch.randn(4, 3, 2, 2, generator=generator), torch.tensor([0, 2, 4, 5])
    noise = [torch.randn(4, 3, 2, 2, generator=generator) for _ in range(2)]
    linear_log_ratio = lambda x_vp, tau, y: (x_vp * dg_direction).flatten(1).sum(1)
    dg, cg = DiscriminatorGuidance(linear_log_ratio, t_min=0.0), linear_classifier(cg_weights)
    zero_model = lambda x, t, y: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    def sample(**kwargs):
        draws = iter(noise)
        return ddpm.ddpm_sampler(zero_model, latents, labels, schedule, randn_like=lambda x: next(draws), classifier=cg,
                                 cg_scale=0.75, dg=dg, dg_weight=1.0, dg_switch_step=0, **kwargs)

    forwards = []
    cg.classifier = lambda x_vp, tau, forward=cg.classifier: forwards.append(tau) or forward(x_vp, tau)
    out = sample(cg_scale_late=1.5, cg_switch_step=500, eds=True, dg_boost=1 / 0.75, dg_norm_ratio=True)
    assert len(forwards) == 3  # one classifier forward per step: EDS reads the logits of the gradient's forward

    x, signs = latents, []
    for step, i in enumerate((2, 1, 0)):
        k = schedule.timesteps[i]
        mean, log_variance, _ = schedule.p_mean_variance(torch.zeros_like(x), torch.zeros_like(x), x, i)
        logits = x.flatten(1) @ cg_weights
        probs = torch.softmax(logits, 1)
        grad_cg = (cg_weights.T[labels] - probs @ cg_weights.T).view_as(x)  # grad log softmax[y], linear classifier
        entropy = -(probs * probs.log()).sum(1)
        assert entropy.min() > 0.5  # far from one-hot (log 6 = 1.79 is uniform)
        w_cg = (0.75 if k > 500 else 1.5) * math.log(6) / entropy
        shift = w_cg.view(-1, 1, 1, 1) * grad_cg
        if k > 0:
            grad_dg = dg_direction.expand_as(x)
            log_ratio = (x * dg_direction).flatten(1).sum(1)
            w_dg = grad_cg.flatten(1).norm(dim=1) / grad_dg.flatten(1).norm(dim=1)
            if step % 2 == 1:
                w_dg = torch.where(log_ratio < 0, w_dg / 0.75, w_dg)
                signs = (log_ratio < 0).tolist()
            shift = shift + w_dg.view(-1, 1, 1, 1) * grad_dg
        mean = mean + torch.exp(log_variance) * shift
        x = mean + torch.exp(0.5 * log_variance) * noise[step] if i > 0 else mean
    assert True in signs and False in signs  # the boost met both kinds of samples
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert (out - sample()).abs().max() > 1e-2  # the schedules changed the samples


def test_schedules_without_a_classifier_or_with_a_bad_boost_fail_before_any_model_call():
    def model_fn(x, t, y):
        raise AssertionError("the model must not run")

    for kwargs in ({"eds": True}, {"dg_norm_ratio": True}, {"cg_scale_late": 1.5}):
        with pytest.raises(ValueError, match="needs a classifier guidance object"):
            ddpm.ddpm_sampler(model_fn, torch.zeros(1, 4, 2, 2), torch.tensor([1]), **kwargs)
    with pytest.raises(ValueError, match="dg_boost must be > 0"):
        ddpm.ddpm_sampler(model_fn, torch.zeros(1, 4, 2, 2), torch.tensor([1]), dg_boost=0.0)


class DiscreteVP:
    """The discrete schedule's own VP at tau = k / (T - 1): alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k), exact at
    every timestep (the continuous LinearVP is only close to it), so d* below is the exact ratio at each DDIM step."""

    def __init__(self, num_timesteps=1000):
        self.abar, self.last = torch.cumprod(1.0 - ddpm.linear_betas(num_timesteps), 0), num_timesteps - 1

    def alpha(self, tau):
        return self.abar[(tau * self.last).round().long()].sqrt()

    def sigma(self, tau):
        return (1.0 - self.abar[(tau * self.last).round().long()]).sqrt()


def mixture_eps(mixture, vp):
    """The exact eps model of a mixture in the DDPM's coordinates: eps(x_k, k) = -sqrt(1 - abar_k) score_k(x_k)."""
    def model_fn(x, t, class_labels=None):
        tau = t.double() / vp.last
        alpha, sigma = vp.alpha(tau), vp.sigma(tau)
        return (-sigma[:, None] * mixture.score(x, alpha, sigma)).to(x.dtype)
    return model_fn


def test_ddim_with_the_optimal_discriminator_takes_the_data_models_steps():
    """Theorem 1 per DDIM step: eps_q - sqrt(1 - abar) grad log(p / q) = -sqrt(1 - abar) grad log p = eps_p, so every
    step of DDIM on the wrong model q with DG by the exact d* (weight 1) is the data model's step from the same x_k.
    Each step's eps' is read back from the sampler's own states (x_{k_i} as the model sees it, and the output x0)
    through DDIM's update, which is linear in eps'."""
    from dg_lightning.toy import OptimalDiscriminator
    from mixtures import default_pair

    data, model = default_pair()
    vp, schedule = DiscreteVP(), ddpm.DDPMSchedule(1000, "20")
    latents = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    states, model_eps, data_eps = [], mixture_eps(model, vp), mixture_eps(data, vp)

    def spy(x, t, class_labels=None):
        states.append((x.clone(), t.clone()))
        return model_eps(x, t)

    dg = DiscriminatorGuidance(OptimalDiscriminator(data, model, vp), t_min=0.0, t_max=1.0)
    x0 = ddpm.ddim_sampler(spy, latents, schedule=schedule, dg=dg, dg_weight=1.0, dg_switch_step=-1,  # every step
                           dtype=torch.float64)
    nexts = [x for x, _ in states[1:]] + [x0]
    gap = 0.0
    for i, ((x, t), after) in zip(range(len(schedule.timesteps) - 1, -1, -1), zip(states, nexts)):
        abar, abar_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        if i == 0:  # the output: x0 = (x - sqrt(1 - abar) eps') / sqrt(abar)
            eps = (x - math.sqrt(abar) * after) / math.sqrt(1.0 - abar)
        else:  # x' = c (x - sqrt(1 - abar) eps') + sqrt(1 - abar') eps', c = sqrt(abar' / abar)
            c = math.sqrt(abar_prev / abar)
            eps = (after - c * x) / (math.sqrt(1.0 - abar_prev) - c * math.sqrt(1.0 - abar))
        # The DG gradient is float32 (guidance.py): |grad| <= 30 here, so about 2e-6 on eps' at most (measured 4e-7).
        torch.testing.assert_close(eps, data_eps(x, t), rtol=0, atol=1e-5)
        gap = max(gap, (model_eps(x, t) - data_eps(x, t)).abs().max().item())
    assert gap > 0.1  # without DG the steps are the wrong model's
