"""Bad configuration fails before any compute, naming the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S
from hydra.errors import ConfigCompositionException, InstantiationException

from dg_lightning.config import ConfigError, validate
from dg_lightning.pipelines import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, key, fix", [
    (["guidance.dg.t_min=0.5", "guidance.dg.t_max=0.1"], "guidance.dg.t_max", r"auto or a number in \(t_min, 1\]"),
    (["guidance.dg.t_max=1.5"], "guidance.dg.t_max", r"\(0.01, 1\] in VP time, got 1.5. Fix: set guidance.dg.t_max=auto"),
    (["guidance.dg.t_max=high"], "guidance.dg.t_max", "got 'high'"),
    (["guidance.dg.t_max=auto", "~callbacks.held_out"], "guidance.dg.t_max", "add callbacks.held_out"),
    (["experiment=digits_edm_g++", "guidance.dg.t_max=auto", "discriminator.select=best"], "guidance.dg.t_max",
     "use discriminator.select=last with auto"),
    (["data.num_held_out=0"], "data.num_held_out", "integer >= 1, got 0"),
    (["callbacks=none"], "callbacks.sampling", "no _target_ .* Fix: also drop it with ~callbacks.sampling"),
    (["guidance.dg.weight=-1"], "guidance.dg.weight", ">= 0"),
    (["guidance.dg.weight_2nd=-0.5"], "guidance.dg.weight_2nd", ">= 0"),
    (["guidance.dg.weight=inf"], "guidance.dg.weight", "finite number >= 0, got inf"),
    (["guidance.dg.weight=nan"], "guidance.dg.weight", "finite number >= 0, got nan"),
    (["guidance.dg.weight=abc"], "guidance.dg.weight", "finite number >= 0, got 'abc'"),
    (["data.num_real=0"], "data.num_real", "integer >= 1, got 0"),
    (["data.num_real=-5"], "data.num_real", "integer >= 1, got -5"),
    (["data.num_fake=0"], "data.num_fake", "integer >= 1, got 0"),
    (["metrics.num_samples=0"], "metrics.num_samples", "integer >= 1, got 0"),
    (["discriminator.lr=-1e-3"], "discriminator.lr", "finite number > 0, got -0.001"),
    (["discriminator.lr_schedule=step"], "discriminator.lr_schedule", "constant, linear, cosine"),
    (["discriminator.ema_decay=1.0"], "discriminator.ema_decay", "in .0, 1., got 1.0"),
    (["discriminator.ema_decay=0"], "discriminator.ema_decay", "in .0, 1., got 0"),
    (["trainer.max_steps=-3"], "trainer.max_steps", "-1 .no limit. or >= 1, got -3"),
    (["sampler.solver=rk23"], "sampler.solver", "heun"),
    (["sampler=rk45", "sampler.rtol=0"], "sampler.rtol", "finite number > 0, got 0"),
    (["sampler=rk45", "sampler.atol=-1e-5"], "sampler.atol", "finite number > 0"),
    (["sampler=rk45", "sampler.eps=1.5"], "sampler.eps", "0 < eps < T <= 1, got T=1.0, eps=1.5"),
    (["sampler=rk45", "sampler.T=0"], "sampler.eps", "0 < eps < T <= 1"),
    (["checkpoints.keep=-2"], "checkpoints.keep", "integer >= -1 .-1 keeps every epoch checkpoint., got -2"),
    (["data.batch_size=7"], "data.batch_size", "even"),
    (["+data.real_path=/nonexistent/true_data.npz"], "data.real_path", "does not exist"),
    (["stage=evaluate"], "stage", "generate"),
    (["experiment=digits_edm_g++", "data.source=/nonexistent/digits.npz"], "data.source", "uint8"),
    (["experiment=digits_edm_g++", "metrics.features=resnet"], "metrics.features", "inception"),
    (["experiment=digits_edm_g++", "metrics.features=inception"], "metrics.inception_path",
     "download https://github.com/toshas/torch-fidelity/releases/.*weights-inception-2015-12-05-6726825d.pth"),
    (["experiment=digits_edm_g++", "metrics.features=inception", "metrics.inception_path=/nonexistent/inception.pth"],
     "metrics.inception_path", "set metrics.inception_path to its local path"),
    (["seed=-1"], "seed", r"must be an integer in \[0, 2\*\*32 - 1\], got -1. Fix: use e.g. seed=0"),
    (["seed=null"], "seed", "got None"),
    ([f"seed={2**32}"], "seed", "got 4294967296"),
    (["experiment=digits_edm_g++", "metrics.sampling_seed=1.5"], "metrics.sampling_seed", "got 1.5"),
    (["experiment=digits_edm_g++", f"metrics.sampling_seed={2**32}"], "metrics.sampling_seed", "got 4294967296"),
    (["experiment=digits_edm_g++", "callbacks.sampling.seed=true"], "callbacks.sampling.seed", "got True"),
    (["experiment=digits_edm_g++", "callbacks.sampling.monitor=fdi"], "callbacks.sampling.monitor",
     "unknown metric 'fdi'. Fix: use one of fid, precision"),
    (["experiment=digits_edm_g++", "callbacks.sampling.mode=lowest"], "callbacks.sampling.mode", "must be min or max"),
    (["experiment=digits_edm_g++", "discriminator.select=first"], "discriminator.select", "must be last or best"),
    (["experiment=digits_edm_g++", "discriminator.select=best", "~callbacks.sampling"], "discriminator.select",
     "callbacks.sampling is not configured"),
    (["experiment=cifar10_edm_g++", "discriminator.select=best", "trainer.max_epochs=0", "data.path=null"],
     "discriminator.select",
     "trains no head"),
])
def test_bad_values_name_the_key_and_the_fix(compose_cfg, overrides, key, fix, tmp_path):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=fix) as error:
        run(cfg)
    assert error.value.key == key
    assert not (tmp_path / "logs" / "cache").exists()  # nothing was computed


def test_non_positive_definite_covariance_is_refused_before_compute(compose_cfg, tmp_path):
    cfg = compose_cfg("data.mixture.covariances.1=[[1.0,2.0],[2.0,1.0]]")
    with pytest.raises(InstantiationException, match=r"data.mixture.covariances\[1\].*positive definite"):
        run(cfg)
    assert not (tmp_path / "logs" / "cache").exists()


def test_unknown_keys_and_groups_are_refused_by_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="guidance.dg.wieght"):
        compose_cfg("guidance.dg.wieght=1")
    with pytest.raises(ConfigCompositionException, match="experiment.*nope"):
        compose_cfg("experiment=nope")
    validate(compose_cfg())  # the default config is valid


def test_entry_point_exits_nonzero_with_the_message(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "guidance.dg.t_min=2", f"paths.log_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert result.returncode != 0
    assert "guidance.dg.t_min" in result.stderr and "Fix:" in result.stderr


@pytest.mark.parametrize("experiment, smoke", [("cifar10_edm_g++", "edm"), ("imagenet_dit_g++", "imagenet"),
                                               ("imagenet_adm_g++", "imagenet_adm")])
def test_a_smoke_overlay_runs_on_the_cpu_unless_the_command_line_picks_the_trainer(compose_cfg, experiment, smoke):
    on_cpu = compose_cfg(f"experiment={experiment}", f"+smoke={smoke}")
    on_gpu = compose_cfg(f"experiment={experiment}", f"+smoke={smoke}", "trainer=gpu")
    assert (on_cpu.trainer.accelerator, on_gpu.trainer.accelerator) == ("cpu", "gpu")
    assert on_cpu.trainer.max_epochs == on_gpu.trainer.max_epochs == 1


@pytest.mark.parametrize("overrides, key, message", [
    (["trainer=gpu"], "trainer.accelerator", r"is gpu but this machine has no CUDA device.*Fix: use trainer=default "
                                             r"\(the CPU\) here, or run on a machine with a CUDA GPU"),
    (["trainer.accelerator=cuda"], "trainer.accelerator", "is cuda but this machine has no CUDA device"),
    (["accel=gpu"], "accel", r"sets accel.compile=default, accel.autocast=bf16 \(the GPU fast path\) but the networks "
                             r"run on the CPU \(trainer.accelerator=cpu\). Fix: use accel=none on the CPU, or trainer=gpu"),
    (["accel.compile=default"], "accel", r"sets accel.compile=default \(the GPU fast path\)"),
])
def test_a_gpu_setting_without_cuda_is_a_config_error_before_compute(compose_cfg, monkeypatch, overrides, key, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=message) as error:
        validate(compose_cfg(*overrides))
    assert error.value.key == key


def test_the_gpu_fast_path_on_a_cuda_machine_passes_the_device_checks(compose_cfg, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    validate(compose_cfg("trainer=gpu", "accel=gpu"))
