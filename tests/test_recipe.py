"""The one runner (pipelines.recipe): a stage sees only what it declares, its cache folder follows its declaration and
its inputs' folders, `stage=` stops after a stage, every experiment's declarations name keys that exist, an experiment
on an existing pipeline is one YAML file, and a sampler is one function plus one config file."""

import hashlib
import inspect
import json
import os
import time
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from dg_lightning import files as files_module
from dg_lightning.config import ConfigError
from dg_lightning.pipelines import pipelines, recipe, run
from dg_lightning.pipelines.recipe import Pipeline, Stage, UndeclaredKeyError, config_view, run_pipeline
from dg_lightning.solvers import solver
from dg_lightning.toy import GaussianMixture, MixtureDenoiser

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY_TOY = ["logger=csv", "callbacks=none", "~callbacks.sampling", "data.num_real=256", "data.num_fake=256", "data.batch_size=64",
            "sampler.num_steps=4", "trainer.max_steps=10", "discriminator.net.width=16", "discriminator.net.depth=2",
            "discriminator.net.time_dim=8", "metrics.num_samples=64", "metrics.num_projections=16"]


def plain_cfg(tmp_path, **values):
    """The smallest config the runner needs, plus `values`."""
    return OmegaConf.create({"experiment_name": "unit", "pipeline": "unit", "stage": "all", "seed": 0, "logger": {},
                             "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out")},
                             **values})


@pytest.mark.parametrize("read", [lambda cfg: cfg.data.num_fake, lambda cfg: cfg.data.get("num_fake", 7),
                                  lambda cfg: OmegaConf.select(cfg, "data.num_fake"),
                                  lambda cfg: OmegaConf.to_container(cfg.data, resolve=True)])
def test_a_stage_reading_a_key_its_declaration_omits_is_stopped_naming_both(tmp_path, read):
    cfg = plain_cfg(tmp_path, data={"num_fake": 3, "batch_size": 2})
    pipeline = Pipeline("unit", (Stage("generate", lambda run: read(run.cfg), keys=("seed", "data.batch_size")),))
    with pytest.raises(UndeclaredKeyError, match="stage 'generate' read the config key 'data.num_fake'"):
        run_pipeline(cfg, pipeline)
    # Declared, the same read goes through and returns the configured value (not a default).
    declared = Pipeline("unit", (Stage("generate", lambda run: run.metrics.update(n=3 if read(run.cfg) else 0),
                                       keys=("seed", "data")),))
    assert run_pipeline(plain_cfg(tmp_path / "b", data={"num_fake": 3, "batch_size": 2}), declared) == {"n": 3.0}


def chain(tmp_path, **data):
    """Run a two-stage pipeline (a: keys seed, data.a; b: keys data.b, uses data.c, inputs a); {stage: folder name}."""
    folders = {}

    def record(run):
        folders[Path(run.folder).name.split("-")[0]] = Path(run.folder).name
        return sorted(run.results)

    pipeline = Pipeline("unit", (Stage("a", record, keys=("seed", "data.a")),
                                 Stage("b", record, keys=("data.b",), uses=("data.c",), inputs=("a",))))
    run_pipeline(plain_cfg(tmp_path, data={"a": 1, "b": 2, "c": 3, **data}), pipeline)
    return folders


def test_a_stage_folder_follows_its_keys_and_its_inputs_folders_but_not_what_it_only_uses(tmp_path):
    base = chain(tmp_path / "0")
    assert chain(tmp_path / "1", c=30) == base  # data.c is used, not fingerprinted
    other_b = chain(tmp_path / "2", b=20)
    assert other_b["a"] == base["a"] and other_b["b"] != base["b"]
    other_a = chain(tmp_path / "3", a=10)
    assert other_a["a"] != base["a"] and other_a["b"] != base["b"]  # b's input changed: b is made again


def test_stage_option_stops_after_that_stage_and_a_stage_sees_only_its_inputs_results(tmp_path):
    seen = {}

    def stage(name):
        def fn(run):
            seen[name] = sorted(run.results)
            return name
        return Stage(name, fn, keys=("seed",), inputs=("a",) if name == "c" else ())

    pipeline = Pipeline("unit", (stage("a"), stage("b"), stage("c"), stage("d")))
    run_pipeline(plain_cfg(tmp_path, stage="c"), pipeline)
    assert seen == {"a": [], "b": [], "c": ["a"]}
    with pytest.raises(ConfigError, match=r"unknown stage 'e' for pipeline unit.*\['a', 'b', 'c', 'd'\]"):
        run_pipeline(plain_cfg(tmp_path, stage="e"), pipeline)


def test_config_view_keeps_the_declared_and_runtime_keys_resolved(tmp_path):
    cfg = plain_cfg(tmp_path, data={"a": "${seed}", "b": 2}, trainer={"accelerator": "cpu", "max_steps": 5})
    view = config_view(cfg, "s", ("data.a",))
    assert view.data.a == 0 and view.trainer.accelerator == "cpu" and view.paths.cache_dir == cfg.paths.cache_dir
    for read in (lambda: view.data.b, lambda: view.trainer.max_steps, lambda: view.seed):
        with pytest.raises(UndeclaredKeyError):
            read()


def compose_with(tmp_path, conf_dir, *overrides):
    """The real config composed with an extra config folder on Hydra's search path, as run.py would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            f"hydra.searchpath=[file://{conf_dir}]", f"paths.log_dir={tmp_path}/logs",
            f"paths.output_dir={tmp_path}/out", *overrides])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_every_experiments_stage_declarations_name_keys_its_config_has(compose_cfg):
    known = pipelines()
    for file in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose_cfg(f"experiment={file.stem}")
        for stage in known[cfg.pipeline].stages:
            for key in (*stage.declared_keys(cfg), *stage.uses, *stage.declared_files(cfg)):
                assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", (file.stem, stage.name, key)


def test_every_released_file_an_experiment_checks_is_fingerprinted_by_content_in_a_stage(compose_cfg):
    for file in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose_cfg(f"experiment={file.stem}")
        pipeline = pipelines()[cfg.pipeline]
        module = inspect.getmodule(pipeline.check)  # the pipeline's module, with its released_files(cfg) if it has any
        if hasattr(module, "released_files"):
            declared = {key for stage in pipeline.stages for key in stage.declared_files(cfg)}
            assert set(module.released_files(cfg)) <= declared, file.stem


def test_an_experiment_on_an_existing_pipeline_is_one_yaml_file(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny_toy.yaml").write_text(
        "# @package _global_\ndefaults:\n  - toy2d\n  - _self_\n\nexperiment_name: tiny_toy\n"
        "data:\n  num_real: 256\n  num_fake: 256\n  batch_size: 64\nsampler:\n  num_steps: 4\n"
        "trainer:\n  max_steps: 10\ndiscriminator:\n  net: {width: 16, depth: 2, time_dim: 8}\n"
        "metrics:\n  num_samples: 64\n  num_projections: 16\n")
    from_file = run(compose_with(tmp_path, tmp_path / "conf", "experiment=tiny_toy", "logger=csv", "callbacks=none",
                                 "~callbacks.sampling"))
    cache = tmp_path / "logs" / "cache" / "tiny_toy"
    folders = sorted(p.name for p in cache.iterdir())
    # The same settings given on the command line: the same metrics, from the same (reused) stage folders.
    by_overrides = run(compose_with(tmp_path / "o", tmp_path / "conf", *TINY_TOY, "experiment_name=tiny_toy",
                                    f"paths.cache_dir={tmp_path}/logs/cache"))
    assert by_overrides == from_file and sorted(p.name for p in cache.iterdir()) == folders
    assert set(from_file) == {"toy/swd_no_dg", "toy/swd_dg", "toy/swd_dg_optimal", "toy/swd_floor",
                              "toy/nfe_no_dg", "toy/nfe_dg", "toy/nfe_dg_optimal"}
    assert from_file["toy/nfe_no_dg"] == from_file["toy/nfe_dg"] == 2 * 4 - 1  # Heun, 4 steps


SIGMA = 5.0


@solver("one_step_denoise", score="denoiser")
def one_step_denoise(denoiser, latents, class_labels=None, dg=None, dg_weight=0.0, sigma=80.0,
                     randn_like=torch.randn_like, progress=False):
    """x = D(sigma z; sigma) + w sigma^2 grad log(d / (1 - d)): one denoising step from sigma, DG-corrected."""
    x = sigma * latents
    denoised = denoiser(x, torch.full((x.shape[0],), sigma), class_labels)
    if dg is not None and dg_weight != 0.0:
        denoised = denoised + dg_weight * sigma**2 * dg.edm(x, sigma, class_labels)[1]
    return denoised


def test_a_sampler_is_one_function_and_one_config_file(tmp_path):
    (tmp_path / "conf" / "sampler").mkdir(parents=True)
    (tmp_path / "conf" / "sampler" / "one_step.yaml").write_text(f"solver: one_step_denoise\nsigma: {SIGMA}\n")
    tiny = [o for o in TINY_TOY if not o.startswith("sampler.")]
    cfg = compose_with(tmp_path, tmp_path / "conf", "sampler=one_step", "stage=generate", *tiny)
    run(cfg)
    (fakes,) = (tmp_path / "logs" / "cache" / "toy2d").glob("generate-*")
    model = GaussianMixture(**{k: v for k, v in OmegaConf.to_container(cfg.score.mixture).items() if k != "_target_"})
    latents = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))  # the toy's fakes stream (seed 0)
    expected = MixtureDenoiser(model)(SIGMA * latents, torch.full((256,), SIGMA))
    made = torch.load(fakes / "fakes.pt", weights_only=True)
    assert len(made) == 256 + cfg.data.num_held_out  # the training fakes, then the held-out ones
    torch.testing.assert_close(made[:256], expected, rtol=0, atol=0)
    # A DG setting the sampler cannot apply is refused before any compute, and so is an unknown setting.
    for overrides, key in ((["guidance.dg.weight_2nd=0.5"], "guidance.dg.weight_2nd"),
                           (["+sampler.num_steps=3"], "sampler.num_steps")):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            run(compose_with(tmp_path / "x", tmp_path / "conf", "sampler=one_step", *tiny, *overrides))
        assert not (tmp_path / "x" / "logs" / "cache").exists()


@pytest.mark.parametrize("experiment, sampler", [("cifar10_edm_g++", "ddpm_dit"), ("toy2d", "ddim"),
                                                  ("imagenet_dit_g++", "edm_heun")])
def test_a_sampler_for_another_kind_of_score_model_is_a_config_error(compose_cfg, tmp_path, experiment, sampler):
    with pytest.raises(ConfigError, match="config key 'sampler.solver'.*score.kind is") as error:
        run(compose_cfg(f"experiment={experiment}", f"sampler={sampler}"))
    assert "use a sampler config with a solver for" in str(error.value)
    assert not (tmp_path / "logs" / "cache").exists()


def test_each_stage_is_announced_as_run_or_cached_and_the_run_ends_with_its_metrics(tmp_path, capsys, monkeypatch):
    now = [100.0]  # the runner's clock: the made stage takes 2.5 s of it when it runs, the others none
    monkeypatch.setattr(recipe, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time))

    def write(run):
        if not (run.folder / "out.txt").exists():
            now[0] += 2.5
        (run.folder / "out.txt").write_text("x")
        run.metrics["unit/value"] = 0.5

    pipeline = Pipeline("unit", (Stage("made", write, keys=("seed",)), Stage("plain", lambda run: None)))
    for name in ("first", "second"):
        cfg = plain_cfg(tmp_path)
        cfg.paths.output_dir = str(tmp_path / name)
        run_pipeline(cfg, pipeline)
    first, second = capsys.readouterr().out.split("unit finished")[:2]
    assert "stage 1/2 made: running" in first and "stage 2/2 plain: running" in first
    assert "stage 1/2 made: from the cache" in second and "stage 2/2 plain: running" in second  # no folder: no cache
    assert "unit/value  0.5" in second
    (folder,) = (tmp_path / "cache" / "unit").iterdir()
    assert json.loads((folder / "stage.json").read_text()) == {"keys": {"seed": 0}, "files": {}, "inputs": []}
    times = {name: json.loads((tmp_path / name / "stage_times.json").read_text()) for name in ("first", "second")}
    assert times["first"] == {"made": {"seconds": 2.5, "cached": False}, "plain": {"seconds": 0.0, "cached": False}}
    assert times["second"] == {"made": {"seconds": 0.0, "cached": True}, "plain": {"seconds": 0.0, "cached": False}}


def test_a_released_file_replaced_at_its_path_makes_the_stage_again_and_is_hashed_once_per_size_and_mtime(
        tmp_path, monkeypatch):
    hashed = []
    content_hash = files_module.content_hash
    monkeypatch.setattr(files_module, "content_hash", lambda path: hashed.append(path) or content_hash(path))
    checkpoint = tmp_path / "released" / "score.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"network A")
    folders = []
    pipeline = Pipeline("unit", (Stage("load", lambda run: folders.append(run.folder.name), keys=("seed",),
                                       files=("data.path",)),))

    def folder(name):
        """The load stage's folder in a run (its own run folder, the shared cache)."""
        cfg = plain_cfg(tmp_path, data={"path": str(checkpoint)})
        cfg.paths.output_dir = str(tmp_path / name)
        run_pipeline(cfg, pipeline)
        return folders[-1]

    first = folder("1")
    assert folder("2") == first and len(hashed) == 1  # same size and mtime: the cached hash, no new read
    mtime = checkpoint.stat().st_mtime_ns
    checkpoint.write_bytes(b"network B")  # another network of the same size, at the same path
    os.utime(checkpoint, ns=(mtime + 10**9, mtime + 10**9))
    replaced = folder("3")
    assert replaced != first and len(hashed) == 2
    record = json.loads((tmp_path / "cache" / "unit" / replaced / "stage.json").read_text())
    assert record["files"] == {"data.path": "sha256:" + hashlib.sha256(b"network B").hexdigest()}
    os.utime(checkpoint, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))  # touched, bytes unchanged: hashed again, same id
    assert folder("4") == replaced and len(hashed) == 3
    cache = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert cache == {str(checkpoint): {"size": 9, "mtime_ns": mtime + 2 * 10**9,
                                       "sha256": hashlib.sha256(b"network B").hexdigest()}}


def test_a_folder_is_fingerprinted_by_its_listing_and_an_absent_file_adds_nothing(tmp_path):
    images = tmp_path / "images"
    (images / "n01").mkdir(parents=True)
    (images / "n01" / "a.png").write_bytes(b"1")
    cfg = plain_cfg(tmp_path, data={"path": str(images)})
    before = recipe.file_contents(cfg, ("data.path",))["data.path"]
    (images / "n01" / "b.png").write_bytes(b"2")
    after = recipe.file_contents(cfg, ("data.path",))["data.path"]
    assert before.startswith("listing:") and after.startswith("listing:") and before != after
    absent = plain_cfg(tmp_path, data={"path": str(tmp_path / "none.pt")})
    assert recipe.file_contents(absent, ("data.path",)) == {"data.path": None}
    contents = recipe.file_contents(absent, ("data.path",))
    assert recipe.fingerprint(absent, ("seed",), contents=contents) == recipe.fingerprint(absent, ("seed",))
