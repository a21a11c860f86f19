"""data.py: dataset readers on fake files in their real on-disk formats, subsets, augmentation."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (ImageSet, InMemoryBatches, RandomResizedCropFlip, UserError, class_balanced_subset, decode_image,
                  eval_transform, holdout_split, load_split, normalize)


def write_cifar(root, ten=True, per_batch=6):
    """Fake CIFAR batches in torchvision's python layout (pickles with numpy arrays, protocol 2)."""
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if ten else ["train", "test"]
    label_key = "labels" if ten else "fine_labels"
    classes = 10 if ten else 100
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: [int(x) for x in rng.integers(0, classes, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta_name, meta_key = ("batches.meta", "label_names") if ten else ("meta", "fine_label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    return folder


def save_image(path, size=(12, 10), mode="RGB", color=(200, 30, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode in ("RGB", "RGBA") else color[0]).save(path)


def make_imagefolder(root, splits=True, per_class=3):
    for split in (["train", "test"] if splits else [""]):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
            for i in range(per_class):
                save_image(root / split / cls / f"{i}.png", size=(16, 16), color=color)
    return root


def test_cifar10_reader_on_torchvision_layout(tmp_path):
    write_cifar(tmp_path)
    train = load_split("cifar10", "train", data_root=str(tmp_path))
    test = load_split("cifar10", "test", data_root=str(tmp_path))
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32) and len(train.classes) == 10
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="latin1")  # the test's own file: safe to unpickle here
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert train.labels[0] == first["labels"][0]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    write_cifar(tmp_path, ten=False)
    train = load_split("cifar100", "train", data_root=str(tmp_path))
    assert train.images.shape == (6, 3, 32, 32) and len(train.classes) == 100 and train.classes[3] == "class3"


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": []}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_split("cifar10", "test", data_root=str(tmp_path))
    assert not marker.exists()


def test_missing_cifar_without_network_names_the_way_out(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="imagefolder:"):
        load_split("cifar10", "train", data_root=str(tmp_path))


def test_imagefolder_with_split_folders(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    train = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8)
    test = load_split(f"imagefolder:{root}", "test", data_root=str(tmp_path), storage_size=8)
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(test) == 6
    assert train.images.shape == (6, 3, 8, 8)
    cats = train.images[train.labels == 0].float()
    assert cats[:, 0].mean() > 250 and cats[:, 1].mean() < 5  # red stays red


def test_imagefolder_without_splits_holds_out_a_seeded_tenth(tmp_path):
    root = make_imagefolder(tmp_path / "flat", splits=False, per_class=10)
    train = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8, cache=False)
    test = load_split(f"imagefolder:{root}", "test", data_root=str(tmp_path), storage_size=8, cache=False)
    assert len(train) == 18 and len(test) == 2 and sorted(test.labels.tolist()) == [0, 1]


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_imagefolder_from_tar_equals_the_folder(tmp_path, suffix, mode):
    root = make_imagefolder(tmp_path / "pets")
    archive = tmp_path / f"pets{suffix}"
    with tarfile.open(archive, mode) as tar:
        tar.add(root, arcname="pets")
    from_dir = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8, cache=False)
    from_tar = load_split(f"imagefolder:{archive}", "train", data_root=str(tmp_path), storage_size=8, cache=False)
    assert torch.equal(from_dir.images, from_tar.images) and torch.equal(from_dir.labels, from_tar.labels)


def test_decoded_folders_are_cached_and_the_cache_follows_the_source(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    first = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8)
    assert len(os.listdir(tmp_path / "cache")) == 1
    again = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8)
    assert torch.equal(first.images, again.images) and again.classes == first.classes
    other = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=4)
    assert other.images.shape[-1] == 4 and len(os.listdir(tmp_path / "cache")) == 2


def make_tiny_imagenet(root):
    base = root / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tunused\n")
    for k, wnid in enumerate(wnids):
        for i in range(3):
            save_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", size=(64, 64),
                       color=(255 * k, 0, 0))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i in range(4):
        save_image(base / "val" / "images" / f"val_{i}.JPEG", size=(64, 64), mode="L", color=(90,))
        lines.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout_from_folder_and_tar(tmp_path):
    root = make_tiny_imagenet(tmp_path / "ti")
    train = load_split(f"tiny-imagenet:{root}", "train", data_root=str(tmp_path), cache=False)
    val = load_split(f"tiny-imagenet:{root}", "test", data_root=str(tmp_path), cache=False)
    assert train.images.shape == (6, 3, 64, 64) and train.classes == ["goldfish", "salamander"]
    assert val.labels.tolist() == [0, 1, 0, 1]
    assert val.images.shape == (4, 3, 64, 64)  # greyscale JPEGs become RGB
    archive = tmp_path / "ti.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "tiny-imagenet-200", arcname="tiny-imagenet-200")
    from_tar = load_split(f"tiny-imagenet:{archive}", "test", data_root=str(tmp_path), cache=False)
    assert torch.equal(from_tar.images, val.images)


def test_digits_is_offline_rgb_32px_and_split_without_overlap():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert train.images.shape[1:] == (3, 32, 32) and len(train) + len(test) == 1797
    assert 300 < len(test) < 400 and train.classes == [str(i) for i in range(10)]


def test_max_per_class_is_balanced_and_seeded():
    a = load_split("digits", "train", max_per_class=7, seed=1)
    b = load_split("digits", "train", max_per_class=7, seed=1)
    assert torch.bincount(a.labels).tolist() == [7] * 10 and torch.equal(a.images, b.images)
    c = load_split("digits", "train", max_per_class=7, seed=2)
    assert not torch.equal(a.images, c.images)


def test_holdout_and_subset_helpers():
    labels = torch.tensor([0] * 10 + [1] * 20)
    train, held = holdout_split(labels, 0.1, 0)
    assert len(set(train.tolist()) & set(held.tolist())) == 0 and len(train) + len(held) == 30
    assert torch.bincount(labels[held]).tolist() == [1, 2]
    subset = class_balanced_subset(labels, 5, 0)
    assert torch.bincount(labels[subset]).tolist() == [5, 5]


@pytest.mark.parametrize("mode, color", [("L", (128,)), ("RGBA", (10, 20, 30, 255)), ("P", (3,)),
                                         ("I;16", (40000,))])
def test_decode_converts_every_mode_to_rgb(mode, color):
    img = Image.new(mode, (5, 7), color[0] if len(color) == 1 else color)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), "x.png")
    assert out.shape == (3, 7, 5) and out.dtype == torch.uint8
    if mode == "I;16":
        assert abs(int(out[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled, not clipped to 255


def test_decode_resizes_shorter_side_and_crops_centre():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (1, 2, 3)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), "wide.png", size=10).shape == (3, 10, 10)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png.*--skip-bad-images"):
        load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8, cache=False)
    data_ = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8, cache=False,
                       skip_bad_images=True)
    assert data_.skipped == 1 and len(data_) == 6


@pytest.mark.parametrize("spec, message", [
    ("imagenet", "unknown dataset"), ("imagefolder:", "needs a path"), ("imagefolder:/no/such/dir", "does not exist"),
    ("digits:/x", "takes no path"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load_split(spec, "train")


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_split(f"imagefolder:{tmp_path / 'empty'}", "train", data_root=str(tmp_path))


def test_augmentation_identity_box_without_flip_is_the_normalised_image():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    augment = RandomResizedCropFlip(16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3)
    out = augment.apply(images, boxes, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out, normalize(images), atol=1e-4, rtol=1e-4)
    flipped = augment.apply(images, boxes, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(flipped, normalize(images).flip(-1), atol=1e-4, rtol=1e-4)


def test_augmentation_crop_equals_interpolating_the_crop():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    augment = RandomResizedCropFlip(8)
    boxes = torch.tensor([[4.0, 8.0, 16.0, 16.0], [0.0, 0.0, 32.0, 16.0]])
    out = augment.apply(images, boxes, torch.zeros(2, dtype=torch.bool))
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        crop = images[i: i + 1, :, top: top + h, left: left + w].float()
        reference = F.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)
        # Exact away from the crop border, where grid_sample may read one pixel outside the crop.
        torch.testing.assert_close(out[i: i + 1, :, 1:-1, 1:-1], normalize(reference / 255.0)[..., 1:-1, 1:-1],
                                   atol=1e-4, rtol=1e-4)


def test_random_boxes_respect_scale_and_stay_inside():
    augment = RandomResizedCropFlip(32, scale=(0.3, 1.0))
    boxes, flips = augment.sample_params(4096, 32, 32, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32 + 1e-4).all() and (left + w <= 32 + 1e-4).all()
    area = h * w / 1024
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 1.0 + 1e-4
    assert 0.45 < flips.float().mean() < 0.55


def test_in_memory_batches_cover_the_epoch_once_per_rank_and_are_seeded():
    labels = torch.arange(40)
    dataset = ImageSet(torch.zeros(40, 3, 8, 8, dtype=torch.uint8), labels, ["x"])
    seen = []
    for rank in range(2):
        loader = InMemoryBatches(dataset, 5, lambda x, g: x, "cpu", seed=3, rank=rank, world_size=2)
        assert len(loader) == 4
        seen += [loader.batch(epoch=0, index=i, step=i)[1] for i in range(len(loader))]
    assert sorted(torch.cat(seen).tolist()) == list(range(40))
    loader = InMemoryBatches(dataset, 5, lambda x, g: x, "cpu", seed=3)
    assert not torch.equal(loader.batch(0, 0, 0)[1], loader.batch(1, 0, 0)[1])
    with pytest.raises(UserError, match="batch size"):
        InMemoryBatches(dataset, 41, lambda x, g: x, "cpu")


def test_eval_transform_resizes_and_normalises():
    images = torch.full((2, 3, 64, 64), 255, dtype=torch.uint8)
    out = eval_transform(images, 32)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[:, :, 0, 0], normalize(torch.ones(2, 3, 1, 1))[:, :, 0, 0])
    assert data.IMAGENET_MEAN[0] == 0.485


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    features = datasets.Features({"picture": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=["even", "odd"])})
    split = datasets.Dataset.from_dict({"picture": images, "kind": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hfdata"))
    loaded = load_split(f"hf:{tmp_path / 'hfdata'}", "train", data_root=str(tmp_path), storage_size=8)
    assert loaded.classes == ["even", "odd"] and loaded.labels.tolist() == [0, 1, 0, 1]
    assert loaded.images.shape == (4, 3, 8, 8) and int(loaded.images[3, 0, 0, 0]) == 120
    with pytest.raises(UserError, match="--image-column"):
        load_split(f"hf:{tmp_path / 'hfdata'}", "test", data_root=str(tmp_path), image_column="nope", cache=False)


def test_imagefolder_labels_agree_across_splits_when_a_class_is_missing_from_one(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    save_image(root / "train" / "emu" / "0.png", size=(16, 16))
    train = load_split(f"imagefolder:{root}", "train", data_root=str(tmp_path), storage_size=8, cache=False)
    test = load_split(f"imagefolder:{root}", "test", data_root=str(tmp_path), storage_size=8, cache=False)
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    assert sorted(set(test.labels.tolist())) == [0, 1]
