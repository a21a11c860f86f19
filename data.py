"""Datasets as uint8 tensors in memory, and batched augmentation that runs on whatever device holds them.

    train = load_split("cifar10", "train", data_root="data")      # ImageSet: (N, 3, 32, 32) uint8 + labels
    augment = RandomResizedCropFlip(32, scale=(0.3, 1.0))
    images = augment(train.images[:256].cuda(), generator)        # (256, 3, 32, 32) float, normalised

Dataset specs (`--dataset`):
  digits                      scikit-learn's bundled 8x8 digits, upscaled to 32 px (offline; tests, quick start)
  cifar10, cifar100           torchvision's on-disk format in --data-root, downloaded when missing
  imagefolder:<dir|tar[.gz]>  class sub-folders; with train/ and test/ (or val/) sub-folders they are the splits,
                              otherwise a seeded 10% of each class is held out as the test split
  tiny-imagenet:<dir|tar.gz>  the original tiny-imagenet-200 layout (val labels from val_annotations.txt)
  hf:<hub id or local path>   Hugging Face `datasets`, with --image-column / --label-column

Decoding, augmentation and masking are separate steps: the training scripts hold a split on the GPU as
uint8 and augment whole batches there, with no DataLoader in the loop; masks come from a Prefetcher (a CPU
thread working ahead). Image folders too large for memory stream instead (StreamedBatches, --stream):
DataLoader workers decode, and the batches get the same augmentation on the GPU.
"""

import copy
import functools
import hashlib
import io
import json
import math
import os
import pickle
import queue
import tarfile
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
HF_COLUMNS = {  # known Hugging Face datasets whose columns are not found by feature type alone
    "uoft-cs/cifar100": ("img", "fine_label"),
    "uoft-cs/cifar10": ("img", "label"),
    "cifar100": ("img", "fine_label"),
    "cifar10": ("img", "label"),
}
NO_NETWORK_HINT = ("no network? put the data on disk and pass --dataset imagefolder:<dir or .tar.gz> "
                   "or hf:<local path>")


class UserError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) long
    classes: list
    skipped: int = 0  # unreadable files skipped under --skip-bad-images

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        return ImageSet(self.images[index], self.labels[index], self.classes, self.skipped)


# ----------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data, name, size=None):
    """Encoded bytes -> (3, H, W) uint8 RGB; greyscale, RGBA, palette and 16-bit images included.

    With `size`, the shorter side is resized to `size` and the centre cropped to size x size."""
    from PIL import Image

    if isinstance(data, OSError):  # from iter_files: the file itself could not be read
        raise UserError(f"cannot read image {name} ({data.strerror or data}); fix the file or pass --skip-bad-images")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = _to_rgb(img)
    except Exception as e:  # PIL raises many types for corrupt data; all mean the same to the user
        raise UserError(f"cannot read image {name} ({type(e).__name__}: {e}); remove the file or pass "
                        "--skip-bad-images") from None
    if size is not None:
        img = _resize_centre_crop(img, size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale, don't clip
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _resize_centre_crop(img, size):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def stack_images(images, names):
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) > 1:
        raise UserError(f"images have different sizes {sorted(sizes)[:3]} (e.g. {names[0]}); "
                        "pass --storage-size to resize them on loading")
    return torch.stack(images) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def progress(iterable, desc, total=None, unit="img"):
    """A tqdm bar for a loop a person may wait on (decoding a folder, extracting features): on stderr, shown
    only after 2 s, and quiet when stderr is not a terminal (logs, tests) or on a process other than the
    first of a distributed launch (every process reads the data; one bar is enough)."""
    from tqdm.auto import tqdm

    first_process = os.environ.get("RANK", "0") == "0"
    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=2, leave=False, dynamic_ncols=True,
                disable=None if first_process else True)


# ----------------------------------------------------------------------------------------------------
# Files from a folder or a tar archive, read in one pass


def iter_files(path, wanted):
    """Yield (relative path, bytes) for files under a folder or inside a tar archive, where wanted(rel).
    A folder entry that cannot be read (no permission, a broken link, a pipe) yields its OSError in place
    of the bytes: decode_image reports it by name, and --skip-bad-images counts it like a corrupt image."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path, onerror=_unlistable_folder):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                if wanted(rel):
                    yield rel, read_bytes(full)
        return
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    yield member.name.lstrip("./"), tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read archive {path} ({e}); it is truncated or not a tar file") from None


def read_bytes(path):
    """The file's bytes, or the OSError that stops reading them."""
    if not os.path.isfile(path):  # reading a named pipe would wait forever; a broken link has nothing to read
        return OSError(f"not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


def _unlistable_folder(error):
    raise UserError(f"cannot list folder {error.filename} ({error.strerror}); fix its permissions or move it away")


def check_path(path, what):
    if not os.path.exists(path):
        raise UserError(f"{what} path {path} does not exist; check the --dataset path")
    if os.path.isfile(path) and not tarfile.is_tarfile(path):
        raise UserError(f"{what} path {path} is a file but not a tar archive; pass a folder or a .tar/.tar.gz")


def is_image(rel):
    return rel.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(rel).startswith(".")


def decode_all(entries, size, skip_bad):
    """entries: (name, bytes, label) -> (images, labels, names kept, skipped count)."""
    images, labels, names, skipped = [], [], [], 0
    for name, data, label in progress(entries, "decoding images"):
        try:
            images.append(decode_image(data, name, size))
        except UserError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        labels.append(label)
        names.append(name)
    if skipped and not images:
        raise UserError(f"all {skipped} images are unreadable (e.g. {entries[0][0]}); check the dataset path")
    return images, labels, names, skipped


# ----------------------------------------------------------------------------------------------------
# Readers: each returns (images list or tensor, labels, classes, skipped)


def imagefolder_place(rel):
    """(split folder or None, class name or None) of an image path inside an image folder."""
    parts = rel.split("/")
    for i, part in enumerate(parts[:-2]):
        if part in ("train", "test", "val"):
            return part, parts[i + 1]
    return None, parts[-2] if len(parts) >= 2 else None


def imagefolder_classes(path, has_splits):
    """Sorted class names over all splits of an image folder, from file names alone."""
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                 for root, _, files in os.walk(path) for f in files]
    else:
        with tarfile.open(path) as tar:
            names = [m.name.lstrip("./") for m in tar if m.isfile()]
    places = [imagefolder_place(rel) for rel in names if is_image(rel)]
    return sorted({cls for where, cls in places if cls is not None and (where is not None) == has_splits})


def imagefolder_wanted(split):
    """Which files of an image folder to read for `split`: its own and unsplit ones (so the other split's
    bytes never enter memory)."""
    split_dirs = {"train": ("train",), "test": ("test", "val")}[split]
    return lambda rel: is_image(rel) and imagefolder_place(rel)[0] in (None, *split_dirs)


def imagefolder_select(items, split, path):
    """(rel, payload) pairs read with imagefolder_wanted -> ([(rel, payload, label)] of `split`, classes,
    whether the folder has split sub-folders)."""
    placed = [(rel, payload, *imagefolder_place(rel)) for rel, payload in progress(items, f"reading {path}",
                                                                                    unit="file")]
    has_splits = any(where is not None for _, _, where, _ in placed)
    chosen = [(rel, payload, cls) for rel, payload, where, cls in placed
              if cls is not None and (where is not None or not has_splits)]
    if not chosen:
        raise UserError(f"no images for split {split!r} in {path}: expected <class>/<image> folders, "
                        "optionally under train/ and test/ (or val/)")
    classes = imagefolder_classes(path, has_splits)  # from every split, so labels agree across splits
    index = {cls: i for i, cls in enumerate(classes)}
    return [(rel, payload, index[cls]) for rel, payload, cls in chosen], classes, has_splits


def read_imagefolder(path, split, size, skip_bad, seed):
    check_path(path, "imagefolder")
    entries, classes, has_splits = imagefolder_select(iter_files(path, imagefolder_wanted(split)), split, path)
    images, labels, names, skipped = decode_all(entries, size, skip_bad)
    data = ImageSet(stack_images(images, names), torch.tensor(labels, dtype=torch.long), classes, skipped)
    if not has_splits:
        train_idx, test_idx = holdout_split(data.labels, 0.1, seed)
        data = data.subset(train_idx if split == "train" else test_idx)
    return data


def read_tiny_imagenet(path, split, size, skip_bad):
    check_path(path, "tiny-imagenet")
    files = dict(iter_files(path, lambda rel: rel.endswith((".txt", ".JPEG", ".jpeg", ".jpg"))))
    roots = sorted({rel[: -len("wnids.txt")] for rel in files if rel.endswith("wnids.txt")}, key=len)
    if not roots:
        raise UserError(f"{path} is not in the tiny-imagenet-200 layout (no wnids.txt); "
                        "use imagefolder: for other layouts")
    root = roots[0]
    wnids = text_file(files, root + "wnids.txt", path).split()
    words = {}
    if root + "words.txt" in files:
        for line in text_file(files, root + "words.txt", path).splitlines():
            wnid, _, names = line.partition("\t")
            words[wnid] = names.split(",")[0].strip()
    index = {wnid: i for i, wnid in enumerate(wnids)}
    entries = []
    if split == "train":
        for rel, data in files.items():
            parts = rel[len(root):].split("/")
            if rel.startswith(root + "train/") and len(parts) == 4 and parts[1] in index and is_image(rel):
                entries.append((rel, data, index[parts[1]]))
    else:
        annotations = files.get(root + "val/val_annotations.txt")
        if annotations is None:
            raise UserError(f"{path} has no val/val_annotations.txt; the tiny-imagenet-200 archive is incomplete")
        for line in text_file(files, root + "val/val_annotations.txt", path).splitlines():
            fields_ = line.split("\t")
            rel = root + "val/images/" + fields_[0]
            if len(fields_) >= 2 and rel in files and fields_[1] in index:
                entries.append((rel, files[rel], index[fields_[1]]))
    entries.sort(key=lambda e: e[0])
    images, labels, names, skipped = decode_all(entries, size, skip_bad)
    classes = [words.get(w, w) for w in wnids]
    return ImageSet(stack_images(images, names), torch.tensor(labels, dtype=torch.long), classes, skipped)


def text_file(files, rel, path):
    """A text file of the dataset from iter_files' {rel: bytes or OSError}, or one line naming what is wrong."""
    payload = files[rel]
    try:
        if isinstance(payload, OSError):
            raise payload
        return payload.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {rel} in {path} ({e}); the dataset is damaged") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow the few numpy globals they need and nothing else,
    so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to unpickle {module}.{name} from a dataset file: not a CIFAR batch")


def _read_batch(path):
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); delete the folder to download it again") from None


def read_cifar(name, split, data_root):
    ten = name == "cifar10"
    folder = os.path.join(data_root, "cifar-10-batches-py" if ten else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]) if split == "train" else (
        ["test_batch"] if ten else ["test"])
    meta_file, meta_key, label_key = ("batches.meta", "label_names", "labels") if ten else (
        "meta", "fine_label_names", "fine_labels")
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files + [meta_file]):
        download_cifar(name, data_root)
    batches = [_read_batch(os.path.join(folder, f)) for f in files]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    classes = list(_read_batch(os.path.join(folder, meta_file))[meta_key])
    return ImageSet(torch.from_numpy(data), torch.from_numpy(labels).long(), classes)


def download_cifar(name, data_root):
    from torchvision.datasets import CIFAR10, CIFAR100

    try:
        (CIFAR10 if name == "cifar10" else CIFAR100)(data_root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(f"cannot download {name} into {data_root} ({e}); {NO_NETWORK_HINT}") from None


def read_digits(split, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    data = ImageSet(images, torch.from_numpy(digits.target).long(), [str(i) for i in range(10)])
    train_idx, test_idx = holdout_split(data.labels, 0.2, seed)
    return data.subset(train_idx if split == "train" else test_idx)


def read_hf(hub_id, split, size, image_column, label_column):
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets need the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(hub_id) if os.path.isdir(hub_id) and os.path.isfile(
            os.path.join(hub_id, "dataset_dict.json")) else datasets.load_dataset(hub_id)
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot load Hugging Face dataset {hub_id} ({type(e).__name__}: {e}); "
                        f"{NO_NETWORK_HINT}") from None
    names = [split] + (["test", "validation", "val"] if split == "test" else [])
    part = next((ds[n] for n in names if n in ds), None)
    if part is None:
        raise UserError(f"{hub_id} has no {split!r} split (it has {list(ds)})")
    image_column, label_column = hf_columns(hub_id, part.features, image_column, label_column)
    classes = getattr(part.features[label_column], "names", None) or sorted(set(part[label_column]))
    images = []
    for i, img in enumerate(progress(part[image_column], f"decoding {hub_id}")):
        buffer = io.BytesIO()
        _to_rgb(img).save(buffer, format="PNG")
        images.append(decode_image(buffer.getvalue(), f"{hub_id}[{i}]", size))
    labels = torch.tensor(part[label_column], dtype=torch.long)
    return ImageSet(stack_images(images, [hub_id]), labels, [str(c) for c in classes])


def hf_columns(hub_id, features, image_column, label_column):
    import datasets

    default_image, default_label = HF_COLUMNS.get(hub_id, (None, None))
    image_column = image_column or default_image or next(
        (k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    label_column = label_column or default_label or next(
        (k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    for what, column in (("image", image_column), ("label", label_column)):
        if column is None or column not in features:
            raise UserError(f"cannot find the {what} column of {hub_id} (columns: {list(features)}); "
                            f"pass --{what}-column")
    return image_column, label_column


# ----------------------------------------------------------------------------------------------------
# Splits and subsets


def holdout_split(labels, fraction, seed):
    """Seeded per-class split of indices into (train, held out), each sorted."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def seeded_sample(total, size, seed):
    """Sorted indices of min(size, total) items drawn at random: splits are often sorted by class, so
    their first items would be one class."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def class_balanced_subset(labels, per_class, seed):
    """Seeded choice of at most per_class indices of each class, sorted."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def load_split(spec, split, data_root="data", storage_size=None, max_per_class=None, seed=0,
               skip_bad_images=False, image_column=None, label_column=None, cache=True):
    """Read one split ("train" or "test") of a dataset spec into memory as an ImageSet.

    Decoded folders, archives and hub datasets are cached under data_root/cache (keyed by the source's
    path, size and time stamp and the settings), so the second run starts at once."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kind, _, arg = spec.partition(":")
    if kind in ("cifar10", "cifar100", "digits") and arg:
        raise UserError(f"--dataset {kind} takes no path; use imagefolder:{arg} for a folder")
    if kind in ("imagefolder", "tiny-imagenet", "hf") and not arg:
        raise UserError(f"--dataset {kind} needs a path or id: {kind}:<path>")
    if kind == "digits":
        data = read_digits(split, seed)
    elif kind in ("cifar10", "cifar100"):
        data = read_cifar(kind, split, data_root)
    elif kind in ("imagefolder", "tiny-imagenet", "hf"):
        data = cached_read(kind, arg, split, data_root, storage_size, skip_bad_images, seed,
                           image_column, label_column, cache)
    else:
        raise UserError(f"unknown dataset {spec!r}; use digits, cifar10, cifar100, imagefolder:<dir>, "
                        "tiny-imagenet:<dir>, or hf:<hub id>")
    if len(data) == 0:
        raise UserError(f"the {split} split of {spec} is empty; check the path and its layout")
    if max_per_class:
        data = data.subset(class_balanced_subset(data.labels, max_per_class, seed))
    return data


def cached_read(kind, arg, split, data_root, storage_size, skip_bad, seed, image_column, label_column, cache):
    def read():
        if kind == "imagefolder":
            return read_imagefolder(arg, split, storage_size, skip_bad, seed)
        if kind == "tiny-imagenet":
            return read_tiny_imagenet(arg, split, storage_size, skip_bad)
        return read_hf(arg, split, storage_size, image_column, label_column)

    if not cache or (kind != "hf" and not os.path.exists(arg)):
        return read()
    stat = os.stat(arg) if os.path.exists(arg) else None
    key = json.dumps([kind, os.path.abspath(arg) if stat else arg, stat and stat.st_size, stat and stat.st_mtime_ns,
                      folder_fingerprint(arg) if stat else None, split, storage_size, skip_bad, seed, image_column,
                      label_column, 1])
    path = os.path.join(data_root, "cache", hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")
    if os.path.isfile(path):
        try:
            return _load_cached(path)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    data = read()
    try:
        _save_cached(path, data)
    except OSError:  # a read-only data root only costs the cache
        pass
    return data


def folder_fingerprint(path):
    """(files, total bytes, newest mtime of a file or folder) under a folder, from stat alone: a file replaced,
    added, removed or renamed inside a class folder changes it, where the top folder's own mtime does not.
    None for an archive, whose own size and mtime already tell."""
    if not os.path.isdir(path):
        return None
    count = size = newest = 0
    for root, _, files in os.walk(path):
        newest = max(newest, os.stat(root).st_mtime_ns)
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # a broken link: read_bytes reports it when the folder is read
                continue
            count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime_ns)
    return count, size, newest


def _save_cached(path, data):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    meta = {"classes": json.dumps(data.classes), "skipped": str(data.skipped)}
    save_file({"images": data.images.contiguous(), "labels": data.labels}, tmp, metadata=meta)
    os.replace(tmp, path)


def _load_cached(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        return ImageSet(f.get_tensor("images"), f.get_tensor("labels"), json.loads(meta["classes"]),
                        int(meta["skipped"]))


# ----------------------------------------------------------------------------------------------------
# Batched augmentation (any device)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 or [0, 1] float (B, 3, H, W) -> float normalised by the ImageNet mean and std."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean, std = channel_stats(x.device, tuple(mean), tuple(std))
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def channel_stats(device, mean, std):
    """Mean and std as (1, 3, 1, 1) tensors on `device`, made once: building them from Python lists at every
    step would be a blocking host-to-GPU copy, a synchronisation per step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def eval_transform(images, image_size):
    """Deterministic: resize whole images to image_size (antialiased), then normalise."""
    x = images.float()
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x / 255.0 if images.dtype == torch.uint8 else x)


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop + horizontal flip + normalisation, for a whole batch at once.

    Each image gets its own box (area fraction ~ U(scale), log aspect ~ U(log ratio), first of 10 tries
    that fits, else the whole image) and flip; one `grid_sample` resamples all of them bilinearly. Boxes
    are continuous (sub-pixel), which is what the resampling does anyway."""

    def __init__(self, size, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), flip=True, tries=10):
        self.size, self.scale, self.ratio, self.flip, self.tries = size, scale, ratio, flip, tries

    def sample_params(self, batch, height, width, generator):
        """Boxes (B, 4) as (top, left, height, width) in pixels (float) and flips (B,) bool."""
        device = generator.device
        u = torch.rand((4, batch, self.tries), generator=generator, device=device)
        area = (self.scale[0] + u[0] * (self.scale[1] - self.scale[0])) * height * width
        log_r = math.log(self.ratio[0]) + u[1] * (math.log(self.ratio[1]) - math.log(self.ratio[0]))
        w = torch.sqrt(area * log_r.exp())
        h = torch.sqrt(area / log_r.exp())
        fits = (w <= width) & (h <= height)
        first = torch.where(fits.any(1), fits.float().argmax(1), 0)  # first try that fits
        pick = lambda t: t.gather(1, first[:, None]).squeeze(1)
        ok = fits.any(1)
        h = torch.where(ok, pick(h), float(height))
        w = torch.where(ok, pick(w), float(width))
        top = torch.where(ok, pick(u[2]) * (height - h), 0.0)
        left = torch.where(ok, pick(u[3]) * (width - w), 0.0)
        flips = torch.rand(batch, generator=generator, device=device) < 0.5 if self.flip else torch.zeros(
            batch, dtype=torch.bool, device=device)
        return torch.stack([top, left, h, w], 1), flips

    def apply(self, images, boxes, flips):
        """images (B, 3, H, W) uint8 or float in [0, 255] -> (B, 3, size, size) normalised float."""
        return normalize(self.resample(images, boxes, flips))

    def resample(self, images, boxes, flips):
        """The crops before normalisation: (B, 3, size, size) float in [0, 1] (for colour augmentation)."""
        B, _, H, W = images.shape
        top, left, h, w = boxes.float().unbind(1)
        sign = 1.0 - 2.0 * flips.float()
        theta = torch.zeros(B, 2, 3, device=images.device)
        theta[:, 0, 0] = w / W * sign
        theta[:, 0, 2] = (2 * left + w) / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = (2 * top + h) / H - 1
        grid = F.affine_grid(theta, (B, 3, self.size, self.size), align_corners=False)
        x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x / 255.0

    def __call__(self, images, generator):
        boxes, flips = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, boxes, flips)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def luminance(x):
    """(B, 3, H, W) RGB -> (B, 1, H, W) grey level."""
    return torch.einsum("bchw,c->bhw", x, torch.tensor(LUMA_WEIGHTS, device=x.device, dtype=x.dtype))[:, None]


class ColourJitter:
    """Batched colour distortion of [0, 1] images (B, 3, H, W), each image with its own random draw:
    with probability p, brightness, contrast and saturation factors ~ U(1 - s, 1 + s) and a hue shift of
    U(-hue, hue) turns, in that order, each result clipped to [0, 1]; then greyscale with probability
    p_grey. The hue shift rotates the chroma plane of YIQ space, a cheap stand-in for torchvision's HSV
    shift; torchvision also shuffles the order of the four steps."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, p_grey=0.2):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p, self.p_grey = p, p_grey

    def __call__(self, x, generator):
        B = x.shape[0]
        u = torch.rand((6, B, 1, 1, 1), generator=generator, device=generator.device).to(x.device)
        factor = lambda r, strength: 1.0 + (2.0 * r - 1.0) * strength
        y = (x * factor(u[0], self.brightness)).clamp(0, 1)
        mean_grey = luminance(y).mean((2, 3), keepdim=True)
        y = ((y - mean_grey) * factor(u[1], self.contrast) + mean_grey).clamp(0, 1)
        grey = luminance(y)
        y = ((y - grey) * factor(u[2], self.saturation) + grey).clamp(0, 1)
        y = rotate_hue(y, (2.0 * u[3] - 1.0) * self.hue * 2 * math.pi).clamp(0, 1)
        x = torch.where(u[4] < self.p, y, x)
        return torch.where(u[5] < self.p_grey, luminance(x).expand_as(x), x)


RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def rotate_hue(x, angle):
    """Rotate the chroma (I, Q) of (B, 3, H, W) RGB images by angle (B, 1, 1, 1) radians."""
    to_yiq = torch.tensor(RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = angle.cos(), angle.sin()
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


MASK_SEED_OFFSET = 7_777  # the training scripts' masks draw from step_generator(seed + this): not the augmentations'


def step_generator(seed, step, rank=0, device="cpu"):
    """A generator for one training step: randomness is a pure function of (seed, rank, step), so a
    resumed run draws exactly what an uninterrupted one would, with no generator state to save."""
    mixed = (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


class EpochBatches:
    """What the in-memory and the streamed inputs share: a seeded permutation per epoch, split across
    processes by rank, and batch(epoch, index, step), which augments the uint8 batch that the subclass's
    uint8_batch(epoch, index) puts on the device, with the step's own generator."""

    def __init__(self, labels, batch_size, augment, device, seed=0, rank=0, world_size=1):
        self.per_process = len(labels) // world_size
        if batch_size > self.per_process:
            raise UserError(f"batch size {batch_size} is larger than the {self.per_process} images each process "
                            f"gets from a split of {len(labels)}; lower --batch-size")
        self.labels = labels
        self.batch_size, self.augment, self.device = batch_size, augment, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._order = (None, None)  # (epoch, this process's order) of the last epoch asked for

    def __len__(self):
        return self.per_process // self.batch_size

    def epoch_order(self, epoch):
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.labels), generator=generator)
            self._order = (epoch, order[self.rank: self.per_process * self.world_size: self.world_size])
        return self._order[1]

    def batch_span(self, index):
        return slice(index * self.batch_size, (index + 1) * self.batch_size)

    def batch(self, epoch, index, step):
        """The index-th batch of an epoch, augmented with the step's own generator."""
        images, labels = self.uint8_batch(epoch, index)
        generator = step_generator(self.seed, step, self.rank, self.device)
        return self.augment(images, generator), labels


class InMemoryBatches(EpochBatches):
    """Batches of a uint8 ImageSet for one process, augmented on the device that holds the images (the GPU
    with --data-on-gpu)."""

    def __init__(self, data, batch_size, augment, device, seed=0, rank=0, world_size=1, data_on_device=True):
        super().__init__(data.labels, batch_size, augment, device, seed, rank, world_size)
        self.images = data.images.to(device) if data_on_device else data.images
        self._device_order = (None, None)  # (epoch, the order on the images' device)

    def uint8_batch(self, epoch, index):
        order = self.epoch_order(epoch)
        if self._device_order[0] != epoch:  # one copy an epoch: a CPU index would be a blocking copy every step
            self._device_order = (epoch, order.to(self.images.device))
        images = self.images[self._device_order[1][self.batch_span(index)]]
        return to_device(images, self.device), self.labels[order[self.batch_span(index)]]


def to_device(tensor, device):
    """Copy without blocking the host: CPU tensors bound for a GPU go through pinned memory."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def map_tensors(item, fn):
    """A shallow copy of a tensor or an object with attributes (e.g. masks.Masks), fn applied to each tensor."""
    if isinstance(item, torch.Tensor):
        return fn(item)
    copied = copy.copy(item)
    for name, value in vars(item).items():
        if isinstance(value, torch.Tensor):
            setattr(copied, name, fn(value))
    return copied


# ----------------------------------------------------------------------------------------------------
# Work ahead of the training step on a background thread


class Prefetcher:
    """make(k) for k = start, start + 1, ... computed ahead on a background thread (at most `depth` results
    waiting, in pinned memory when `device` is a GPU); get(k) returns make(k) with its tensors on `device`.

    The training loop uses it for masks: the sampler's rejection loop reads values (`bad.any()`), which on
    a GPU would be a host synchronisation every step, while on the CPU it runs beside the GPU's work. Each
    result depends on k alone (make(k) seeds its own generator), so get(k) never depends on timing; asking
    for any k other than the next restarts the thread there (a resumed run)."""

    def __init__(self, make, device, depth=4):
        self.make, self.device, self.depth = make, torch.device(device), depth
        self._next, self._queue, self._stop, self._thread = None, None, None, None

    def get(self, k):
        if k != self._next:
            self._start(k)
        item = self._queue.get()
        if isinstance(item, Exception):  # raised by make(k) on the thread: raise it here, where it belongs
            self.close()
            raise item
        self._next = k + 1
        return map_tensors(item, lambda t: t.to(self.device, non_blocking=True))

    def _start(self, k):
        self.close()
        self._queue = queue.Queue(self.depth)
        stop = threading.Event()
        pin = self.device.type == "cuda"
        thread = threading.Thread(target=_produce, args=(self.make, k, pin, self._queue, stop), daemon=True)
        # The thread holds no reference to self, so a dropped Prefetcher is collected and its thread stopped;
        # the finalizer also runs at interpreter exit, when an exception skipped close().
        self._stop = weakref.finalize(self, _stop_and_join, stop, thread)
        thread.start()
        self._next = k

    def close(self):
        """Stop the thread and wait for it."""
        if self._stop is not None:
            self._stop()
        self._next = None


def _stop_and_join(stop, thread):
    """A thread still inside torch when the interpreter exits aborts the process ("terminate called
    without an active exception"): stop it and wait."""
    stop.set()
    if thread is not threading.current_thread():
        thread.join(timeout=10)


def _produce(make, k, pin, out, stop):
    while not stop.is_set():
        try:
            item = make(k)
            item = map_tensors(item, torch.Tensor.pin_memory) if pin else item
        except Exception as e:  # handed to the consumer, which raises it
            item = e
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                pass
        if isinstance(item, Exception):
            return
        k += 1


# ----------------------------------------------------------------------------------------------------
# Streaming from disk (--stream): image folders too large to hold in memory


def list_folder(path, wanted):
    """Relative paths of the files under a folder where wanted(rel), in iter_files' order."""
    found = []
    for root, dirs, files in os.walk(path, onerror=_unlistable_folder):
        dirs.sort()
        found += [rel for rel in (os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
                                  for name in sorted(files)) if wanted(rel)]
    return found


class StreamedImageFolder(torch.utils.data.Dataset):
    """One split of an image folder, decoded an image at a time (in DataLoader workers). Files, labels and
    the held-out split are those read_imagefolder gives, and each image is decoded by decode_image at
    `size`: streamed training sees the pixels the in-memory path would hold."""

    def __init__(self, path, split, size, seed=0, skip_bad=False):
        if not os.path.isdir(path):
            raise UserError(f"--stream reads images from a folder and {path} is not one; extract the archive "
                            "or drop --stream")
        names = [(rel, None) for rel in list_folder(path, imagefolder_wanted(split))]
        entries, self.classes, has_splits = imagefolder_select(names, split, path)
        self.root, self.size, self.skip_bad, self.skipped = path, size, skip_bad, 0
        self.files = [rel for rel, _, _ in entries]
        self.labels = torch.tensor([label for _, _, label in entries], dtype=torch.long)
        if not has_splits:
            train_idx, test_idx = holdout_split(self.labels, 0.1, seed)
            self.keep(train_idx if split == "train" else test_idx)

    def keep(self, index):
        """Keep only the files at `index` (a long tensor), in that order."""
        self.files = [self.files[i] for i in index.tolist()]
        self.labels = self.labels[index]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        """(image (3, size, size) uint8, label, error message or ""). The main process raises the message as
        one line; with skip_bad the next file that decodes stands in for a bad one, keeping batches full."""
        for j in range(i, i + (10 if self.skip_bad else 1)):
            name = self.files[j % len(self.files)]
            data = read_bytes(os.path.join(self.root, name))  # an unreadable file is a bad image, as in memory
            try:
                return decode_image(data, name, self.size), int(self.labels[j % len(self.files)]), ""
            except UserError as e:
                error = str(e)
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1, error

    def load(self, indices):
        """The images at `indices` in memory, as an ImageSet (the collapse monitor's batch)."""
        items = [self[int(i)] for i in indices]
        for _, _, error in items:
            if error:
                raise UserError(error)
        return ImageSet(torch.stack([image for image, _, _ in items]), self.labels[torch.as_tensor(indices)],
                        self.classes)


def open_stream(spec, split, storage_size, max_per_class=None, seed=0, skip_bad_images=False):
    """A StreamedImageFolder for `--dataset imagefolder:<folder>` (the only kind worth streaming)."""
    kind, _, path = spec.partition(":")
    if kind != "imagefolder" or not path:
        raise UserError(f"--stream works with --dataset imagefolder:<folder>, not {spec}; drop --stream to load "
                        "it into memory")
    data = StreamedImageFolder(path, split, storage_size, seed, skip_bad_images)
    if max_per_class:
        data.keep(class_balanced_subset(data.labels, max_per_class, seed))
    return data


class StreamedBatches(EpochBatches):
    """Batches of a StreamedImageFolder: DataLoader workers decode, batches arrive in pinned memory and go
    to the device with a non-blocking copy, then get the same batched augmentation as in memory."""

    def __init__(self, dataset, batch_size, augment, device, seed=0, rank=0, world_size=1, workers=4):
        super().__init__(dataset.labels, batch_size, augment, device, seed, rank, world_size)
        self.sampler = EpochBatchSampler(self)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self._iterator, self._next = None, None

    def uint8_batch(self, epoch, index):
        if self._next != (epoch, index):  # a new epoch, or a resumed run: the sampler starts there
            self.sampler.start = (epoch, index)
            self._iterator = iter(self.loader)
        images, labels, errors = next(self._iterator)
        self._next = (epoch, index + 1)
        error = next((e for e in errors if e), None)
        if error:
            raise UserError(error)
        return to_device(images, self.device), labels


class EpochBatchSampler:
    """The batch_sampler of StreamedBatches: from `start` = (epoch, index) to the end of that epoch."""

    def __init__(self, batches):
        self.batches, self.start = batches, (0, 0)

    def __iter__(self):
        epoch, index = self.start
        order = self.batches.epoch_order(epoch)
        for i in range(index, len(self.batches)):
            yield order[self.batches.batch_span(i)].tolist()

    def __len__(self):
        return len(self.batches) - self.start[1]
