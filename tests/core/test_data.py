"""Data loading: every format round-trips, every bad input fails with a clear DataError."""

from __future__ import annotations

import gzip
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from modelshield.core.data import Dataset, check_dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError

RNG = np.random.default_rng(0)


# -- helpers ---------------------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
    """Write an IDX file by hand: 0x0000, type code, ndim, big-endian dims, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    code = codes[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def mnist_like(n: int = 12, h: int = 5, w: int = 4) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    x[0, 0, 0] = 255
    y = (np.arange(n) % 3).astype(np.uint8)
    return x, y


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(str(c) for c in r) for r in rows) + "\n")
    return path


def raises(match: str, fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match in msg, msg
    assert "\n" not in msg
    return msg


# -- npz -------------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path: Path) -> None:
    x = RNG.random((20, 3, 4, 4), dtype=np.float32)
    y = np.arange(20) % 4
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    ds = load_dataset(p)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    assert ds.num_classes == 4 and len(ds) == 20 and ds.input_shape == (3, 4, 4)
    assert ds.name == "d" and ds.source == str(p)
    info = ds.describe()
    assert info["n"] == 20 and info["shape"] == [3, 4, 4] and info["class_counts"] == [5] * 4
    assert len(info["sha256"]) == 64 and 0.0 <= info["min"] <= info["max"] <= 1.0

    out = ds.to_npz(tmp_path / "sub" / "copy.npz")
    back = load_dataset(out)
    assert torch.equal(back.x, ds.x) and torch.equal(back.y, ds.y)
    assert back.num_classes == 4


def test_npz_custom_keys_and_num_classes(tmp_path: Path) -> None:
    p = tmp_path / "k.npz"
    np.savez(p, images=np.zeros((4, 2), np.float32), targets=np.array([0.0, 1.0, 1.0, 0.0]))
    ds = load_dataset(p, x_key="images", y_key="targets", num_classes=5)
    assert ds.num_classes == 5 and ds.y.tolist() == [0, 1, 1, 0]
    raises("no array 'x'", load_dataset, p)


def test_npz_uint8_auto_scale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "u8.npz"
    x = np.array([[0, 255], [128, 3]], dtype=np.uint8)
    np.savez(p, x=x, y=np.array([0, 1]))
    with caplog.at_level(logging.INFO, logger="modelshield.core.data"):
        ds = load_dataset(p)
    assert "dividing by 255" in caplog.text
    assert float(ds.x.max()) == 1.0 and ds.meta["scale"] == 255.0
    assert torch.equal(load_dataset(p, scale="none", bounds=None).x, torch.tensor(x).float())
    assert float(load_dataset(p, scale=510).x.max()) == 0.5


def test_npz_refuses_pickles(tmp_path: Path) -> None:
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([[1.0], [2.0]], dtype=object), y=np.array([0, 1]))
    raises("pickled", load_dataset, p)


def test_bundled_digits() -> None:
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.source == "bundled:digits" and ds.classes == [str(i) for i in range(10)]
    assert "CC BY 4.0" in ds.meta["license"]
    assert torch.equal(load_dataset("bundled:digits").x, ds.x)
    raises("no such bundled dataset", load_dataset, "bundled:cifar")


def test_bundled_digits_match_scikit_learn() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    ds = load_dataset("bundled:digits")
    assert np.allclose(ds.x.numpy()[:, 0], ref.images / 16.0)
    assert ds.y.tolist() == ref.target.tolist()


# -- CSV -------------------------------------------------------------------------------------
def test_csv_label_column_in_the_middle(tmp_path: Path) -> None:
    p = write_csv(
        tmp_path / "t.csv",
        [["a", "b", "label", "c"], [0.1, 0.2, 1, 0.3], [0.4, 0.5, 0, 0.6], [0.7, 0.8, 2.0, 0.9]],
    )
    ds = load_dataset(p)
    assert ds.x.shape == (3, 3) and ds.y.tolist() == [1, 0, 2] and ds.num_classes == 3
    assert torch.allclose(ds.x[1], torch.tensor([0.4, 0.5, 0.6]))
    assert ds.meta["feature_columns"] == ["a", "b", "c"]
    # named explicitly, and a default of "last column" when there is no "label"
    q = write_csv(tmp_path / "u.csv", [["f1", "cls", "f2"], [1, 0, 0], [0, 1, 1]])
    assert load_dataset(q, label_column="cls").y.tolist() == [0, 1]
    assert load_dataset(q).y.tolist() == [0, 1] and load_dataset(q).meta["label_column"] == "f2"


def test_csv_text_labels_quotes_and_reshape(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text('p0,p1,p2,p3,kind\n"0",255,0,0,dog\n0,0,128,0,cat\n\n0,0,0,64,dog\n')
    ds = load_dataset(p, input_shape=(1, 2, 2))
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [1, 0, 1]
    assert ds.input_shape == (1, 2, 2) and ds.meta["scale"] == 255.0  # whole numbers 0..255


def test_csv_gz_and_semicolons(tmp_path: Path) -> None:
    p = tmp_path / "t.csv.gz"
    p.write_bytes(gzip.compress(b"x1;x2;label\n0.5;0.25;1\n0;1;0\n"))
    assert load_dataset(p).y.tolist() == [1, 0]


# -- IDX -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    x, y = mnist_like()
    ext = ".gz" if gz else ""
    img = write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x, gz=gz)
    lab = write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y, gz=gz)
    for spec in (img, lab, tmp_path, f"{img},{lab}"):
        ds = load_dataset(spec)
        assert ds.x.shape == (12, 1, 5, 4) and ds.y.tolist() == y.tolist()
        assert torch.allclose(ds.x[:, 0], torch.from_numpy(x).float() / 255)
        assert ds.num_classes == 3 and ds.meta["format"] == "idx" and ds.name == "train"


def test_idx_dot_naming_variant(tmp_path: Path) -> None:
    x, y = mnist_like(4)
    img = write_idx(tmp_path / "t10k-images.idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", y)
    assert len(load_dataset(img)) == 4


def test_idx_errors(tmp_path: Path) -> None:
    x, y = mnist_like()
    img = write_idx(tmp_path / "a-images-idx3-ubyte", x)
    raises("labels file not found", load_dataset, img)
    write_idx(tmp_path / "a-labels-idx1-ubyte", y[:5])
    raises("lengths differ", load_dataset, img)
    blob = img.read_bytes()
    img.write_bytes(blob[:-7])
    raises("truncated", load_dataset, img)
    img.write_bytes(b"\x08\x03" + blob[2:])
    raises("not an IDX file", load_dataset, img)
    bad = tmp_path / "b-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(blob)[:-10])
    write_idx(tmp_path / "b-labels-idx1-ubyte.gz", y, gz=True)
    raises("corrupt gzip", load_dataset, bad)
    raises("holds 2 IDX pairs", load_dataset, tmp_path)


# -- image folders ---------------------------------------------------------------------------
def make_image_folder(root: Path, mode: str = "L", size: tuple[int, int] = (6, 5)) -> Path:
    image = pytest.importorskip("PIL.Image")
    for c, cls in enumerate(["cat", "ant", "bee"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.full(
                (size[1], size[0]) + ((3,) if mode == "RGB" else ()), 40 * c + i, np.uint8
            )
            image.fromarray(arr, mode=mode).save(root / cls / f"{i}.png")
    return root


def test_image_folder_grayscale(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    (root / "ant" / "notes.txt").write_text("not an image")
    ds = load_dataset(root)
    assert ds.x.shape == (6, 1, 5, 6) and ds.classes == ["ant", "bee", "cat"]
    assert ds.y.tolist() == [0, 0, 1, 1, 2, 2] and ds.num_classes == 3
    assert abs(float(ds.x[0, 0, 0, 0]) - 40 / 255) < 1e-6  # "ant": first image
    assert abs(float(ds.x[5, 0, 0, 0]) - 1 / 255) < 1e-6  # "cat": second image
    assert ds.describe()["sha256_of"] == "manifest"


def test_image_folder_rgb_and_size_mismatch(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    root = make_image_folder(tmp_path / "rgb", mode="RGB")
    ds = load_dataset(root)
    assert ds.x.shape == (6, 3, 5, 6)
    image.fromarray(np.zeros((7, 7), np.uint8)).save(root / "bee" / "big.png")
    msg = raises("differ in size", load_dataset, root)
    assert "big.png" in msg and "0.png" in msg


def test_image_folder_structure_errors(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    flat = tmp_path / "flat"
    flat.mkdir()
    image.fromarray(np.zeros((3, 3), np.uint8)).save(flat / "a.png")
    raises("one sub-folder per class", load_dataset, flat)
    root = make_image_folder(tmp_path / "e")
    (root / "zzz").mkdir()
    raises("has no images", load_dataset, root)
    (root / "zzz" / "broken.png").write_bytes(b"\x89PNG not really")
    raises("cannot read image", load_dataset, root)


# -- validation ------------------------------------------------------------------------------
def npz(tmp_path: Path, x: np.ndarray, y: np.ndarray, name: str = "bad.npz") -> Path:
    p = tmp_path / name
    np.savez(p, x=x, y=y)
    return p


def test_bad_inputs(tmp_path: Path) -> None:
    ok_x = np.zeros((4, 3), np.float32)
    raises("no such file", load_dataset, tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    raises("corrupt", load_dataset, junk)
    raises("no samples", load_dataset, npz(tmp_path, np.zeros((0, 3)), np.zeros(0, int)))
    raises("lengths differ", load_dataset, npz(tmp_path, ok_x, np.array([0, 1, 0])))
    msg = raises(
        "integer class indices", load_dataset, npz(tmp_path, ok_x, np.array([0, 1.5, 0, 1]))
    )
    assert "1.5" in msg and "sample 1" in msg
    raises("negative", load_dataset, npz(tmp_path, ok_x, np.array([0, -1, 0, 1])))
    msg = raises(
        "outside [0, 3)", load_dataset, npz(tmp_path, ok_x, np.array([0, 1, 3, 1])), num_classes=3
    )
    assert "sample 2" in msg
    nan_x = ok_x.copy()
    nan_x[2, 1] = np.nan
    nan_x[3, 0] = np.inf
    msg = raises("2 NaN/inf", load_dataset, npz(tmp_path, nan_x, np.array([0, 1, 0, 1])))
    assert "sample 2" in msg and "bad.npz" in msg
    big = np.full((4, 3), 300.0, np.float32)
    msg = raises("outside bounds [0, 1]", load_dataset, npz(tmp_path, big, np.array([0, 1, 0, 1])))
    assert "--scale" in msg and "300" in msg
    p = npz(tmp_path, ok_x, np.array([0, 1, 0, 1]))
    msg = raises("does not match input_shape", load_dataset, p, input_shape=(1, 2, 2))
    assert "(3,)" in msg and "(1, 2, 2)" in msg
    raises("one-hot", load_dataset, npz(tmp_path, ok_x, np.eye(4)))
    raises(
        "expected numbers", load_dataset, npz(tmp_path, np.array([["a"], ["b"]]), np.array([0, 1]))
    )


def test_bad_csv(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "c.csv", [["a", "b", "label"], [1, 2, 0], [3, "oops", 1]])
    msg = raises("non-numeric value 'oops'", load_dataset, p)
    assert "row 2 (line 3)" in msg and "column 'b'" in msg and "c.csv" in msg
    p = write_csv(tmp_path / "d.csv", [["a", "label"], [1, 0], [2, 1, 5]])
    raises("has 3 fields but the header has 2", load_dataset, p)
    p = write_csv(tmp_path / "e.csv", [["a", "label"]])
    raises("no samples", load_dataset, p)
    p = write_csv(tmp_path / "f.csv", [["a", "label"], [1, 0], [2, "x"]])
    raises("non-numeric label 'x'", load_dataset, p)
    raises("no column named 'target'", load_dataset, p, label_column="target")
    (tmp_path / "g.csv").write_text("")
    raises("empty file", load_dataset, tmp_path / "g.csv")


def test_bad_arguments(tmp_path: Path) -> None:
    p = npz(tmp_path, np.zeros((2, 2), np.float32), np.array([0, 1]), "ok.npz")
    for kwargs in ({"scale": "huge"}, {"scale": -1}, {"bounds": (1, 0)}, {"num_classes": 1}):
        with pytest.raises(InvalidConfigError):
            load_dataset(p, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="CSV files only"):
        load_dataset(p, label_column="label")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04")
    raises("pickle-based files are not read", load_dataset, pt)


def test_unreadable_zip_member(tmp_path: Path) -> None:
    p = tmp_path / "z.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY garbage")
        zf.writestr("y.npy", b"also garbage")
    raises("corrupt", load_dataset, p)


def test_check_dataset_for_external_datasets() -> None:
    ds = Dataset(x=torch.rand(5, 1, 2, 2), y=torch.tensor([0, 1, 2, 0, 1]), num_classes=3)
    assert check_dataset(ds, input_shape=(1, 2, 2), num_classes=10, bounds=(0, 1)) is ds
    raises("outside [0, 2)", check_dataset, ds, num_classes=2)
    raises("does not match input_shape", check_dataset, ds, input_shape=(4,))
    raises("int64", check_dataset, Dataset(x=ds.x, y=ds.y.int(), num_classes=3))
    raises("outside bounds", check_dataset, ds, bounds=(0.5, 1.0))


# -- split / subset --------------------------------------------------------------------------
def test_split_is_deterministic_and_stratified() -> None:
    ds = load_dataset("digits")
    a1, b1 = ds.split(0.25, seed=3)
    a2, b2 = ds.split(0.25, seed=3)
    a3, _ = ds.split(0.25, seed=4)
    assert torch.equal(a1.x, a2.x) and torch.equal(b1.y, b2.y)
    assert not torch.equal(a1.x, a3.x)
    assert len(a1) == round(0.25 * 1797) and len(a1) + len(b1) == 1797
    counts = torch.bincount(a1.y, minlength=10)
    full = torch.bincount(ds.y, minlength=10)
    assert torch.all((counts - 0.25 * full).abs() <= 1)
    r1, _ = ds.split(0.1, seed=0, stratify=False)
    r2, _ = ds.split(0.1, seed=0, stratify=False)
    assert torch.equal(r1.y, r2.y) and len(r1) == 180
    with pytest.raises(InvalidConfigError):
        ds.split(1.0)


def test_subset() -> None:
    ds = Dataset(x=torch.arange(10.0).view(5, 2), y=torch.tensor([0, 1, 0, 1, 0]), num_classes=2)
    sub = ds.subset([4, 0])
    assert sub.x[:, 0].tolist() == [8.0, 0.0] and sub.y.tolist() == [0, 0]
    assert len(ds.subset(torch.tensor([True, False, True, False, False]))) == 2
    with pytest.raises(InvalidConfigError):
        ds.subset([5])
