"""Sharded, resumable generation: per-sample seeds, rank splits, resume after a crash or SIGKILL, errors."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dg_lightning.files import write_atomic
from dg_lightning.generate import counts_nfe, generate, sample_batches
from dg_lightning.pipelines.images import Decoded, mean_nfe
from dg_lightning.seeds import SampleNoise, sample_seed
from dg_lightning.shards import MANIFEST, ShardError, check_shard_headers, load_nfe, load_shards, shard_name

SHAPE = (3, 4, 5)  # C, H, W: stored as (4, 5, 3)
N, SHARD = 20, 6  # shards of 6, 6, 6, 2


def toy_fn(latents, labels, noise):
    """A tiny sampler: latents plus two later per-sample noise draws (like churn), shifted by the label."""
    x = latents + 0.3 * noise.randn_like(latents)
    x = x + 0.2 * noise.randn_like(latents)
    if labels is not None:
        x = x + 0.1 * labels.view(-1, 1, 1, 1)
    return torch.tanh(x)


class Recorder:
    """toy_fn that counts the samples it is called for and can crash after `fail_at` of them."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, latents, labels, noise):
        self.calls += len(latents)
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("simulated crash")
        return toy_fn(latents, labels, noise)


class Counting(Recorder):
    """Recorder that counts NFE as sampling.SampleFn does: batch b (from 0) appends 7 (b + 1) to nfe."""

    def __init__(self, fail_at=None):
        super().__init__(fail_at)
        self.nfe = []

    def __call__(self, latents, labels, noise):
        x = super().__call__(latents, labels, noise)
        self.nfe.append(7 * (len(self.nfe) + 1))
        return x


def expected_sample(i, base_seed=0, num_classes=None):
    """Sample i computed alone from its own seed, quantised by hand: the reference for every run."""
    noise = SampleNoise([sample_seed(base_seed, i)])
    latents = noise.randn((1, *SHAPE))
    labels = noise.randint(num_classes) if num_classes else None
    x = toy_fn(latents, labels, noise)[0].permute(1, 2, 0).double().numpy()
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8), None if labels is None else int(labels)


def shard_files(folder):
    """The shard files in a folder, by name."""
    return sorted(p.name for p in Path(folder).glob("shard-*.npz"))


def test_sample_seed_is_a_deterministic_pair_hash():
    seeds0 = [sample_seed(0, i) for i in range(200)]
    seeds1 = [sample_seed(1, i) for i in range(200)]
    assert seeds0 == [sample_seed(0, i) for i in range(200)]
    assert len(set(seeds0)) == 200 and not set(seeds0) & set(seeds1)  # base seeds share no sample
    assert all(0 <= s < 2**64 for s in seeds0)
    with pytest.raises(ValueError, match="index >= 0"):
        sample_seed(0, -1)


def test_noise_rows_do_not_depend_on_the_batch():
    seeds = [sample_seed(0, i) for i in range(3)]
    batch = SampleNoise(seeds)
    alone = SampleNoise(seeds[1:2])
    for _ in range(2):  # the second draw continues each sample's own stream
        x = batch.randn((3, 4))
        assert torch.equal(x[1:2], alone.randn((1, 4)))
    assert torch.equal(batch.randint(10)[1:2], alone.randint(10))
    like = batch.randn_like(torch.zeros(3, 2, dtype=torch.float64))
    assert like.dtype == torch.float64 and torch.equal(like[1:2], alone.randn((1, 2), dtype=torch.float64))
    assert not torch.equal(x[0], x[1])
    with pytest.raises(ValueError, match="holds 3 samples"):
        batch.randn((2, 4))


@pytest.mark.parametrize("num_classes", [None, 7])
def test_same_samples_for_any_batch_size(tmp_path, num_classes):
    runs = {}
    for batch_size in (1, 3, 8):
        folder = tmp_path / f"b{batch_size}"
        generate(toy_fn, folder, N, SHAPE, batch_size=batch_size, shard_size=SHARD, num_classes=num_classes, progress=False)
        runs[batch_size] = load_shards(folder)
    samples, labels = runs[1]
    assert samples.shape == (N, 4, 5, 3) and samples.dtype == np.uint8
    for other, other_labels in (runs[3], runs[8]):
        assert np.array_equal(samples, other)
        assert (labels is None and other_labels is None) or np.array_equal(labels, other_labels)
    for i in (0, 7, N - 1):
        ref, ref_label = expected_sample(i, num_classes=num_classes)
        assert np.array_equal(samples[i], ref)
        assert ref_label == (None if labels is None else labels[i])
    assert len({s.tobytes() for s in samples}) == N  # the samples differ
    if num_classes:
        assert labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < num_classes
        assert len(set(labels.tolist())) > 1


def test_base_seed_changes_every_sample(tmp_path):
    generate(toy_fn, tmp_path / "a", N, SHAPE, shard_size=SHARD, progress=False)
    generate(toy_fn, tmp_path / "b", N, SHAPE, shard_size=SHARD, base_seed=1, progress=False)
    a, b = load_shards(tmp_path / "a")[0], load_shards(tmp_path / "b")[0]
    assert all(not np.array_equal(a[i], b[i]) for i in range(N))
    assert np.array_equal(b[5], expected_sample(5, base_seed=1)[0])


def test_two_ranks_split_the_shards_and_match_one_rank(tmp_path):
    generate(toy_fn, tmp_path / "one", N, SHAPE, shard_size=SHARD, num_classes=3, progress=False)
    written = []
    for rank in (0, 1):
        before = set(shard_files(tmp_path / "two")) if rank else set()
        generate(
            toy_fn, tmp_path / "two", N, SHAPE, batch_size=4, shard_size=SHARD, num_classes=3,
            rank=rank, world_size=2, progress=False,
        )
        written.append(set(shard_files(tmp_path / "two")) - before)
    assert written == [{shard_name(0), shard_name(2)}, {shard_name(1), shard_name(3)}]
    one, two = load_shards(tmp_path / "one"), load_shards(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_resume_after_a_crash_makes_only_the_missing_samples(tmp_path):
    generate(toy_fn, tmp_path / "full", N, SHAPE, shard_size=SHARD, progress=False)
    crashing = Recorder(fail_at=13)  # crashes inside shard 2 (samples 12..17)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(crashing, tmp_path / "part", N, SHAPE, batch_size=1, shard_size=SHARD, progress=False)
    assert shard_files(tmp_path / "part") == [shard_name(0), shard_name(1)]
    assert not list((tmp_path / "part").glob(".*.tmp"))
    kept = {name: (tmp_path / "part" / name).stat().st_mtime_ns for name in shard_files(tmp_path / "part")}

    resumed = Recorder()
    generate(resumed, tmp_path / "part", N, SHAPE, batch_size=5, shard_size=SHARD, progress=False)
    assert resumed.calls == N - 2 * SHARD
    assert kept == {name: (tmp_path / "part" / name).stat().st_mtime_ns for name in kept}
    assert np.array_equal(load_shards(tmp_path / "full")[0], load_shards(tmp_path / "part")[0])

    again = Recorder()
    generate(again, tmp_path / "part", N, SHAPE, shard_size=SHARD, progress=False)
    assert again.calls == 0


def test_a_counting_sample_fn_stores_its_batch_nfe_with_each_sample(tmp_path):
    counting = Counting()
    assert counts_nfe(counting) and counts_nfe(Decoded(counting, decoder=None)) and not counts_nfe(toy_fn)
    generate(counting, tmp_path, N, SHAPE, batch_size=4, shard_size=SHARD, num_classes=3, progress=False)
    # Shards of 6, 6, 6, 2 in batches of 4: batches of 4, 2 | 4, 2 | 4, 2 | 2, the b-th spending 7 (b + 1).
    expected = np.repeat(7 * np.arange(1, 8), [4, 2, 4, 2, 4, 2, 2])
    assert counting.nfe == [7, 14, 21, 28, 35, 42, 49]
    assert json.loads((tmp_path / MANIFEST).read_text())["nfe"] is True
    with np.load(tmp_path / shard_name(1)) as shard:
        assert set(shard.files) == {"samples", "indices", "labels", "nfe"}
        assert shard["nfe"].dtype == np.int64 and shard["nfe"].tolist() == [21] * 4 + [28] * 2
    nfe = load_nfe(tmp_path)
    assert nfe.dtype == np.int64 and np.array_equal(nfe, expected)
    assert mean_nfe(tmp_path) == (4 * (7 + 21 + 35) + 2 * (14 + 28 + 42 + 49)) / N
    generate(toy_fn, tmp_path / "plain", N, SHAPE, batch_size=4, shard_size=SHARD, num_classes=3, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(load_shards(tmp_path), load_shards(tmp_path / "plain")))


def test_a_sample_fn_that_does_not_count_stores_no_nfe(tmp_path):
    generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, progress=False)
    assert json.loads((tmp_path / MANIFEST).read_text())["nfe"] is False
    assert all(set(np.load(tmp_path / name).files) == {"samples", "indices"} for name in shard_files(tmp_path))
    assert load_nfe(tmp_path) is None and mean_nfe(tmp_path) is None


def test_a_folder_written_before_shards_stored_nfe_loads_and_resumes_storing_none(tmp_path):
    generate(toy_fn, tmp_path / "full", N, SHAPE, shard_size=SHARD, progress=False)
    folder = tmp_path / "old"
    generate(toy_fn, folder, N, SHAPE, shard_size=SHARD, progress=False)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["nfe"]  # the manifest as generate wrote it before shards stored NFE
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert np.array_equal(load_shards(folder)[0], load_shards(tmp_path / "full")[0]) and load_nfe(folder) is None
    (folder / shard_name(2)).unlink()
    kept = {name: (folder / name).stat().st_mtime_ns for name in (shard_name(0), shard_name(1))}

    resumed = Recorder()  # its shards are finished: only the missing one is made
    generate(resumed, folder, N, SHAPE, shard_size=SHARD, progress=False)
    assert resumed.calls == SHARD and kept == {name: (folder / name).stat().st_mtime_ns for name in kept}

    (folder / shard_name(3)).unlink()
    counting = Counting()  # a counting run resumes it too, and stores no NFE in the shard it makes
    generate(counting, folder, N, SHAPE, shard_size=SHARD, progress=False)
    assert counting.calls == N - 3 * SHARD and counting.nfe == [7]
    assert kept == {name: (folder / name).stat().st_mtime_ns for name in kept}
    assert all(set(np.load(folder / name).files) == {"samples", "indices"} for name in shard_files(folder))
    assert "nfe" not in json.loads((folder / MANIFEST).read_text())
    assert np.array_equal(load_shards(folder)[0], load_shards(tmp_path / "full")[0]) and load_nfe(folder) is None


def test_a_folder_that_stores_nfe_refuses_a_run_that_does_not_count_it(tmp_path):
    generate(Counting(), tmp_path, N, SHAPE, shard_size=SHARD, progress=False)
    with pytest.raises(ValueError, match="nfe: the folder's shards store each sample's NFE, this run's sample_fn does "
                                         "not count it"):
        generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, progress=False)


KILL_SCRIPT = """
import sys, time
sys.path[:0] = [{src!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from dg_lightning.generate import generate
from test_generate import toy_fn

def slow_fn(latents, labels, noise):
    time.sleep(0.25)
    return toy_fn(latents, labels, noise)

generate(slow_fn, sys.argv[1], 40, (3, 4, 5), batch_size=2, shard_size=4, num_classes=5, progress=False)
"""


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    tests = Path(__file__).resolve().parent
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(src=str(tests.parent / "src"), tests=str(tests)))
    folder = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(shard_files(folder)) < 2:
            assert proc.poll() is None, f"generation script died: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "generation script made no shard in 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= len(shard_files(folder)) < 10  # killed mid-run
    (folder / ".shard-000009.abc123.tmp").write_bytes(b"half a shard")  # as if killed while writing
    with pytest.raises(FileNotFoundError, match=r"of 10 shards are missing .*Rerun it with the same settings"):
        load_shards(folder)

    generate(toy_fn, folder, 40, SHAPE, batch_size=3, shard_size=4, num_classes=5, progress=False)
    generate(toy_fn, tmp_path / "clean", 40, SHAPE, batch_size=8, shard_size=4, num_classes=5, progress=False)
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    assert shard_files(folder) == [shard_name(k) for k in range(10)]
    (killed, killed_labels), (clean, clean_labels) = load_shards(folder), load_shards(tmp_path / "clean")
    assert np.array_equal(killed, clean) and np.array_equal(killed_labels, clean_labels)


def test_manifest_mismatch_raises_and_keeps_the_shards(tmp_path):
    generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, fingerprint="cfg-a", progress=False)
    before = {name: (tmp_path / name).read_bytes() for name in shard_files(tmp_path)}
    with pytest.raises(ValueError, match=r"base_seed: folder has 0, this run has 1.*another folder"):
        generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, base_seed=1, fingerprint="cfg-a", progress=False)
    with pytest.raises(ValueError, match="fingerprint: folder has 'cfg-a', this run has 'cfg-b'"):
        generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, fingerprint="cfg-b", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        generate(toy_fn, tmp_path, N + 1, SHAPE, shard_size=SHARD, fingerprint="cfg-a", progress=False)
    assert before == {name: (tmp_path / name).read_bytes() for name in shard_files(tmp_path)}
    resumed = Recorder()  # a different batch size and rank count are the same run
    generate(resumed, tmp_path, N, SHAPE, batch_size=2, shard_size=SHARD, fingerprint="cfg-a", world_size=3, progress=False)
    assert resumed.calls == 0


def test_damaged_shards_are_reported_then_made_again(tmp_path):
    generate(toy_fn, tmp_path / "ref", N, SHAPE, shard_size=SHARD, progress=False)
    folder = tmp_path / "run"
    generate(toy_fn, folder, N, SHAPE, shard_size=SHARD, progress=False)
    truncated = folder / shard_name(1)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ShardError, match=r"shard-000001\.npz: unreadable, truncated or corrupt.*uint8 \(6, 4, 5, 3\)"):
        load_shards(folder)
    np.savez(folder / shard_name(3), samples=np.zeros((2, 4, 5, 3), np.float32), indices=np.arange(18, 20))
    truncated.write_bytes((tmp_path / "ref" / shard_name(1)).read_bytes())
    with pytest.raises(ShardError, match=r"shard-000003\.npz: 'samples' is float32 \(2, 4, 5, 3\)"):
        load_shards(folder)

    truncated.write_bytes(b"")
    kept = {k: (folder / shard_name(k)).stat().st_mtime_ns for k in (0, 2)}
    remade = Recorder()
    generate(remade, folder, N, SHAPE, shard_size=SHARD, progress=False)
    assert remade.calls == SHARD + 2  # shards 1 and 3 only
    assert kept == {k: (folder / shard_name(k)).stat().st_mtime_ns for k in (0, 2)}
    assert np.array_equal(load_shards(folder)[0], load_shards(tmp_path / "ref")[0])


def test_a_shard_with_flipped_bytes_under_intact_headers_is_removed_when_read_and_made_again(tmp_path):
    generate(toy_fn, tmp_path / "ref", N, SHAPE, shard_size=SHARD, progress=False)
    folder = tmp_path / "run"
    generate(toy_fn, folder, N, SHAPE, shard_size=SHARD, progress=False)
    damaged = folder / shard_name(2)
    offset, _ = check_shard_headers(damaged, json.loads((folder / MANIFEST).read_text()), 2)
    data = bytearray(damaged.read_bytes())
    data[offset + 3] ^= 0xFF  # a sample byte: the zip's CRC no longer matches, the headers still do
    damaged.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.npz: unreadable.*The shard was removed: rerun"):
        load_shards(folder)
    assert not damaged.exists()
    remade = Recorder()
    generate(remade, folder, N, SHAPE, shard_size=SHARD, progress=False)
    assert remade.calls == SHARD  # that shard only
    assert np.array_equal(load_shards(folder)[0], load_shards(tmp_path / "ref")[0])


def test_load_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the folder is empty"):
        load_shards(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "samples_123.npz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: no manifest"):
        load_shards(tmp_path / "foreign")

    folder = tmp_path / "run"
    generate(toy_fn, folder, N, SHAPE, shard_size=SHARD, progress=False)
    assert load_shards(folder, expect_shape=(4, 5, 3), expect_labels=False)[1] is None
    with pytest.raises(ValueError, match=r"per-sample shape \(4, 5, 3\), expected \(32, 32, 3\)"):
        load_shards(folder, expect_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="unconditional.*expected labels"):
        load_shards(folder, expect_labels=True)
    for k in (0, 2):
        (folder / shard_name(k)).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards are missing \(shard-000000\.npz, shard-000002\.npz\)"):
        load_shards(folder)
    (folder / MANIFEST).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_shards(folder)


def test_shard_header_check_parses_the_zip_once_and_locates_the_samples(tmp_path, monkeypatch):
    generate(toy_fn, tmp_path, N, SHAPE, shard_size=SHARD, num_classes=5, progress=False)
    path, manifest = tmp_path / shard_name(2), json.loads((tmp_path / MANIFEST).read_text())
    parses = []

    class CountingZipFile(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", CountingZipFile)
    offset, labels = check_shard_headers(path, manifest, 2)
    assert len(parses) == 1  # one central-directory parse serves the samples' header and the small members
    with np.load(path) as npz:
        samples, stored_labels = npz["samples"], npz["labels"]
    assert path.read_bytes()[offset:offset + samples.nbytes] == samples.tobytes()
    assert labels.dtype == np.int64 and np.array_equal(labels, stored_labels)


def test_quantisation_follows_edm(tmp_path):
    values = torch.tensor([-1.5, -1.0, 0.0, 0.5, 0.999, 1.0, 2.0], dtype=torch.float64)

    def constant_fn(latents, labels, noise):
        return values.expand(len(latents), 1, 1, -1).clone()

    generate(constant_fn, tmp_path, 3, (1, 1, 7), progress=False)
    samples, _ = load_shards(tmp_path, expect_shape=(1, 7, 1))
    assert samples[:, 0, :, 0].tolist() == [[0, 0, 128, 191, 255, 255, 255]] * 3


def test_float32_points_are_stored_as_returned(tmp_path):
    def points_fn(latents, labels, noise):
        return latents * 2.0 + noise.randn_like(latents)

    generate(points_fn, tmp_path, 9, (2,), dtype="float32", batch_size=4, shard_size=5, progress=False)
    samples, labels = load_shards(tmp_path, expect_shape=(2,))
    noise = SampleNoise([sample_seed(0, 8)])
    assert samples.dtype == np.float32 and labels is None
    assert np.array_equal(samples[8], points_fn(noise.randn((1, 2)), None, noise)[0].numpy())


def test_bad_sampler_output_is_reported(tmp_path):
    wrong = r"sample_fn returned torch.float32 \(2, 3, 5, 4\) for samples 0..1; expected floats \(2, 3, 4, 5\)"
    with pytest.raises(ValueError, match=wrong):
        generate(lambda x, y, n: x.transpose(2, 3), tmp_path / "a", 4, SHAPE, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="NaN or inf for samples 0..1"):
        generate(lambda x, y, n: x / 0.0, tmp_path / "b", 4, SHAPE, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"out_shape must be \(C, H, W\)"):
        generate(toy_fn, tmp_path / "c", 4, (2,), progress=False)


def test_sample_batches_yields_labels_and_names_strided_samples_in_errors():
    """Batches of a rank's strided indices: labels come with the samples; a None in out_shape accepts any size."""
    (b0, x0, y0), (b1, x1, y1) = sample_batches(toy_fn, range(1, 8, 2), SHAPE, num_classes=3, batch_size=2, out_shape=(3, None, 5))
    assert (list(b0), list(b1)) == ([1, 3], [5, 7]) and x0.shape == (2, *SHAPE) and not x0.requires_grad
    noise = SampleNoise([sample_seed(0, 5), sample_seed(0, 7)])
    noise.randn((2, *SHAPE))
    assert torch.equal(y1, noise.randint(3))
    with pytest.raises(ValueError, match=r"float32 \(2, 3, 5, 4\) for samples \[1, 3\]; expected floats \(2, 3, \*, 5\)"):
        next(sample_batches(lambda x, y, n: x.transpose(2, 3), range(1, 8, 2), SHAPE, batch_size=2, out_shape=(3, None, 5)))


def test_write_atomic_leaves_the_old_file_and_no_temp_on_failure(tmp_path):
    """A write that raises keeps the previous contents and removes its temp file; new files get umask permissions."""
    path = tmp_path / "weights.pt"
    write_atomic(path, lambda f: torch.save({"a": torch.ones(2)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def crash(f):
        f.write(b"half")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_atomic(str(path), crash)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]
