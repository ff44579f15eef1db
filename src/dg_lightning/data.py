"""Real and fake sources, and the RealFakeDataModule that diffuses both on the fly.

A source holds clean samples x0 (float vectors, or uint8 NHWC images mapped to [-1, 1] NCHW) and
optional int64 class labels. The data module pairs real and fake samples into balanced batches and,
after the batch reaches the device, draws a new VP time t and new noise z for every sample:
x_t = alpha(t) x0 + sigma_vp(t) z. Nothing diffused is cached: every draw is fresh (augmentation).
"""

import itertools
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dg_lightning.sde import LinearVP


def load_labelled_images(path, image_shape, num_classes):
    """uint8 NHWC images (N, *image_shape) and int64 labels (N,) in [0, num_classes) from an .npz with arrays
    `images` and `labels`; a clear error naming the file and the expected form otherwise."""
    path = Path(path)
    expected = (f"expected an .npz with 'images' uint8 (N, {', '.join(map(str, image_shape))}) (NHWC, N >= 1) "
                f"and 'labels' integer (N,) in [0, {num_classes})")
    if not path.is_file():
        raise FileNotFoundError(f"data source {path} does not exist; {expected}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:  # TypeError: an .npy, not an .npz
        raise ValueError(f"data source {path} is not a readable .npz ({type(e).__name__}: {e}); {expected}") from e
    if not {"images", "labels"} <= set(arrays):
        raise ValueError(f"data source {path} has arrays {sorted(arrays)}; {expected}")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.shape[1:] != tuple(image_shape) or len(images) == 0:
        raise ValueError(f"data source {path} has 'images' {images.dtype} {images.shape}; {expected}")
    if (not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),)
            or labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"data source {path} has 'labels' {labels.dtype} {labels.shape} "
                         f"(values {labels.min() if labels.size else None}..{labels.max() if labels.size else None}); {expected}")
    return images, labels.astype(np.int64)


def load_digits_split(split, num_held_out=597, seed=0, source=None, num_classes=10):
    """Labelled uint8 NHWC images: sklearn's digits (N, 8, 8, 1), values 0..16 scaled to 0..255, or the (N, 8, 8, 1)
    images of the .npz at `source` (load_labelled_images), with int64 labels.

    A fixed permutation (seed) puts num_held_out images in split "held_out" and the rest in "train".
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "held_out"):
        raise ValueError(f"digits split must be 'train' or 'held_out', got {split!r}")
    if source is None:
        digits = load_digits()
        images, labels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], digits.target.astype(np.int64)
    else:
        images, labels = load_labelled_images(source, (8, 8, 1), num_classes)
    if not 0 < num_held_out < len(images):
        raise ValueError(f"data.num_held_out must be in (0, {len(images)}) for the {len(images)} images of "
                         f"{source or 'sklearn digits'}, got {num_held_out}")
    order = np.random.default_rng(seed).permutation(len(images))
    chosen = order[:num_held_out] if split == "held_out" else order[num_held_out:]
    return images[chosen], labels[chosen]


class ShardRows:
    """The rows of arrays stored uncompressed in several files, read from disk on demand: file k holds lengths[k]
    consecutive C-order rows of `dtype` and `sample_shape` starting at byte offsets[k] (a shard's samples.npy member,
    sources.shard_source). Rows follow file order, so a sample set larger than RAM (ImageNet's crops, 78 GB) can feed
    the data loaders without a copy. No file stays open (ImageNet has ~1,300 shards, each loader worker would hold
    them all): a call opens each shard its rows lie in once and reads every run of consecutive rows with one read,
    so a random batch of B rows costs about B opens, seeks and reads of one row each, and a slice a few large reads.
    Pickling (DataLoader workers started by spawn or forkserver) sends the paths and offsets, not the data."""

    def __init__(self, files, offsets, lengths, dtype, sample_shape):
        self.files, self.offsets = [Path(f) for f in files], np.asarray(offsets, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # file k: rows starts[k]..starts[k+1]-1
        self.dtype, self.sample_shape = np.dtype(dtype), tuple(sample_shape)
        self.shape = (int(self.starts[-1]), *self.sample_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.sample_shape, dtype=np.int64))

    def __len__(self):
        return self.shape[0]

    def _rows(self, index):
        """The non-negative row numbers that index (an int, a slice or an integer index array) selects."""
        if isinstance(index, slice):
            return np.arange(*index.indices(len(self)))
        rows = np.asarray(index)
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows are indexed by an int, a slice or an integer array, got {rows.dtype}")
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return np.where(rows < 0, rows + len(self), rows)

    def __getitem__(self, index):
        """The rows at index (an int, a slice or an index array), in that order, as an in-memory array."""
        rows = self._rows(index)
        unique, inverse = np.unique(rows, return_inverse=True)
        data = np.empty((len(unique), self.row_bytes), np.uint8)
        shard = np.searchsorted(self.starts, unique, side="right") - 1
        first = np.flatnonzero((np.diff(unique, prepend=-2) != 1) | (np.diff(shard, prepend=-1) != 0))
        runs = zip(first, [*first[1:], len(unique)])  # [start, stop): consecutive rows of one file
        for k, runs_in_k in itertools.groupby(runs, key=lambda run: shard[run[0]]):
            with open(self.files[k], "rb", buffering=0) as f:
                for start, stop in runs_in_k:
                    f.seek(int(self.offsets[k] + (unique[start] - self.starts[k]) * self.row_bytes))
                    if f.readinto(memoryview(data[start:stop]).cast("B")) != (stop - start) * self.row_bytes:
                        raise OSError(f"{self.files[k]} ends before row {unique[stop - 1] - self.starts[k]}: it was "
                                      "truncated or replaced after it was checked; rerun the stage that wrote it")
        return data[inverse.reshape(-1)].view(self.dtype).reshape(*rows.shape, *self.sample_shape)


class ArraySource(Dataset):
    """Clean samples x0 (an array, or ShardRows read from disk) with optional class labels; uint8 NHWC images become
    float NCHW in [-1, 1]."""

    def __init__(self, samples, labels=None, name="source"):
        if len(samples) == 0:
            raise ValueError(f"{name} is empty: it needs at least one sample")
        if labels is not None and len(labels) != len(samples):
            raise ValueError(f"{name} has {len(samples)} samples but {len(labels)} labels")
        self.samples, self.name = samples, name
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.is_image = isinstance(samples, (np.ndarray, ShardRows)) and samples.dtype == np.uint8

    def __len__(self):
        return len(self.samples)

    def fetch(self, indices):
        """(x0, labels or None) for a batch of sample indices: float32, images as NCHW in [-1, 1]."""
        x = self.samples[np.asarray(indices)]
        if self.is_image:
            x0 = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            x0 = torch.as_tensor(x, dtype=torch.float32)
        return x0, (self.labels[indices] if self.labels is not None else None)

    def __getitem__(self, i):
        """(x0, label or None) for sample i."""
        x0, labels = self.fetch([i])
        return x0[0], (labels[0] if labels is not None else None)


class SourceRows(Dataset):
    """Rows [start, stop) of a source, fetched from it as they are needed (no copy)."""

    def __init__(self, source, start, stop):
        self.source, self.start, self.stop = source, start, stop
        self.labels = None if source.labels is None else source.labels[start:stop]
        self.name = f"{source.name} rows {start}-{stop - 1}"

    def __len__(self):
        return self.stop - self.start

    def fetch(self, indices):
        """(x0, labels or None) of the rows `indices` counted from start."""
        return self.source.fetch(self.start + np.asarray(indices))


def split_held_out(source, num_held_out):
    """(training rows, held-out rows) of source: its last num_held_out rows are held out of training."""
    if not 0 < num_held_out < len(source):
        raise ValueError(f"data.num_held_out={num_held_out} must be below the {len(source)} samples of {source.name}, "
                         "whose last data.num_held_out are held out of discriminator training: lower data.num_held_out")
    cut = len(source) - num_held_out
    return SourceRows(source, 0, cut), SourceRows(source, cut, len(source))


class RealFakePairs(Dataset):
    """Item i pairs real[i mod n_real] with fake[perm(i) mod n_fake]; length max(n_real, n_fake).

    A batch of indices is fetched at once (DataLoader's __getitems__) into one dict: the real half first
    (is_real = True), then the fake half, with class_labels when both sources have them.
    """

    def __init__(self, real: ArraySource, fake: ArraySource, seed=0):
        self.real, self.fake = real, fake
        self.fake_order = torch.randperm(max(len(real), len(fake)), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.fake_order)

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices)
        x_real, y_real = self.real.fetch(indices % len(self.real))
        x_fake, y_fake = self.fake.fetch(self.fake_order[indices] % len(self.fake))
        batch = {"x0": torch.cat([x_real, x_fake]), "is_real": torch.arange(2 * len(indices)) < len(indices)}
        if y_real is not None and y_fake is not None:
            batch["class_labels"] = torch.cat([y_real, y_fake])
        return batch

    def __getitem__(self, i):
        return self.__getitems__([i])


def keep_batch(batch):
    """The collate function for batches that __getitems__ already built."""
    return batch


class RealFakeDataModule(L.LightningDataModule):
    """Balanced real/fake batches (batch_size/2 each), diffused on the fly with importance-sampled (or uniform) t; it
    also holds the held-out split (real, fake) that the diagnostics measure, when given."""

    def __init__(self, real: ArraySource, fake: ArraySource, batch_size=128, t_min=1e-5, importance=True,
                 vp: LinearVP = LinearVP(), num_workers=0, seed=0, conditional=False, held_out=None):
        super().__init__()
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"data.batch_size must be an even number >= 2 (half real, half fake), got {batch_size}")
        if conditional and (real.labels is None or fake.labels is None):
            missing = [s.name for s in (real, fake) if s.labels is None]
            raise ValueError(f"a conditional discriminator needs class labels, but {missing} has none")
        self.real, self.fake = real, fake
        self.batch_size, self.t_min, self.importance, self.vp = batch_size, t_min, importance, vp
        self.num_workers, self.seed, self.conditional = num_workers, seed, conditional
        self.held_out = held_out  # (real, fake) sources never trained on, for HeldOutDiagnostics (or None)

    def train_dataloader(self):
        """Batches in an order that is a function of (seed, epoch) only (a DistributedSampler, over the trainer's ranks,
        whose epoch Lightning sets), never of the global RNG: a resumed epoch sees the batches it would have seen."""
        pairs = RealFakePairs(self.real, self.fake, self.seed)
        ranks = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = DistributedSampler(pairs, *ranks, shuffle=True, seed=self.seed, drop_last=True)
        return DataLoader(
            pairs, batch_size=self.batch_size // 2, sampler=sampler, drop_last=True, collate_fn=keep_batch,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: not drawn from the global RNG either
        )

    def diffuse(self, batch):
        """Add a fresh VP time t and x_t = alpha(t) x0 + sigma_vp(t) z to a batch of clean samples."""
        x0 = batch["x0"]
        t = self.vp.sample_time(x0.shape[0], self.t_min, self.importance, device=x0.device)
        batch["t"] = t
        batch["x_t"] = self.vp.diffuse(x0, t, torch.randn_like(x0))
        if not self.conditional:
            batch.pop("class_labels", None)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Diffuse on the device, after the transfer (cheap on a GPU, no CPU worker needed)."""
        return self.diffuse(batch)
