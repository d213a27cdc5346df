from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pytest
import tifffile

from tomoml_nb import data
from tomoml_nb.tomo import ProjectionData

REAL = ["tomopy_tooth", "spam_snow", "spam_concrete_xray", "spam_concrete_neutron", "sarepy_neutron_sinogram"]


def test_manifest_has_required_real_entries():
    m = data.manifest()
    for name in REAL:
        e = m[name]
        assert e["kind"] == "real"
        assert len(e["sha256"]) == 64
        for key in ("source", "licence", "citation", "reader", "size"):
            assert e[key], key


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="name: unknown data set 'nope'.*spam_snow"):
        data.load("nope")


def test_load_tooth_is_projection_data_in_radians(mirror):
    d = data.load("tomopy_tooth")
    assert isinstance(d, ProjectionData)
    assert d.projections.shape == (181, 2, 640)
    assert d.flats.shape == (10, 2, 640) and d.darks.shape == (10, 2, 640)
    assert d.angles.shape == (181,)
    assert 3.0 < d.angles.max() < np.pi + 1e-6  # 179 degrees, converted


@pytest.mark.parametrize("name,shape", [("spam_snow", (100, 100, 100)), ("spam_concrete_xray", (100, 100, 100)),
                                        ("spam_concrete_neutron", (100, 100, 100)),
                                        ("sarepy_neutron_sinogram", (459, 503))])
def test_load_real_volumes(mirror, name, shape):
    arr = data.load(name)
    assert arr.shape == shape and arr.dtype == np.uint16


def test_cache_mismatch_is_an_error_naming_the_file(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOML_DATA_DIR", str(tmp_path))
    bad = tmp_path / data.info("spam_snow")["file"]
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the snow volume")
    with pytest.raises(data.DataError, match="snow.tif: sha256 mismatch"):
        data.load("spam_snow")
    assert data.verify("spam_snow")["spam_snow"].startswith("MISMATCH")
    assert bad.read_bytes() == b"not the snow volume"  # the user's file is left alone


def test_mirror_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOML_DATA_MIRROR", str(tmp_path))
    f = tmp_path / data.info("tomopy_tooth")["file"]
    f.parent.mkdir(parents=True)
    f.write_bytes(b"corrupt")
    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.path("tomopy_tooth")


def test_missing_everywhere_without_download_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOML_DATA_MIRROR", str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="tomoml data fetch spam_snow"):
        data.path("spam_snow", download=False)


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOML_DATA_MIRROR", str(tmp_path / "empty"))

    def fake(url, sha256, tmp):
        out = tmp / "download"
        out.write_bytes(b"half a fi")
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(data, "_download_url", fake)
    with pytest.raises(data.DataError, match="download failed.*ConnectionError"):
        data.path("tomopy_tooth")
    assert not any(p.is_file() for p in data.cache_dir().rglob("*"))


def _download_wrong_content(tmp_path, monkeypatch):
    """No local mirror, and every download returns bytes that do not match the manifest."""
    monkeypatch.setenv("TOMOML_DATA_MIRROR", str(tmp_path / "empty"))

    def fake(url, sha256, tmp):
        out = tmp / "download"
        out.write_bytes(b"something else")
        return out

    monkeypatch.setattr(data, "_download_url", fake)


def test_download_with_wrong_content_is_rejected(tmp_path, monkeypatch):
    _download_wrong_content(tmp_path, monkeypatch)
    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.path("tomopy_tooth")
    assert not (data.cache_dir() / data.info("tomopy_tooth")["file"]).exists()


def test_download_success_lands_in_cache(mirror, tmp_path, monkeypatch):
    src = mirror / data.info("sarepy_neutron_sinogram")["file"]
    monkeypatch.setenv("TOMOML_DATA_MIRROR", str(tmp_path / "empty"))

    def fake(url, sha256, tmp):
        assert url.startswith("https://")
        out = tmp / "download"
        shutil.copyfile(src, out)
        return out

    monkeypatch.setattr(data, "_download_url", fake)
    p = data.path("sarepy_neutron_sinogram")
    assert p.parent.parent == data.cache_dir()
    assert data.verify("sarepy_neutron_sinogram")["sarepy_neutron_sinogram"] == "ok (cache)"


def test_fetch_copies_from_mirror_into_cache(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOML_DATA_DIR", str(tmp_path / "cache"))
    (p,) = data.fetch("spam_snow")
    assert p.is_file() and str(p).startswith(str(tmp_path))
    assert data.verify("spam_snow")["spam_snow"] == "ok (cache)"
    with pytest.raises(ValueError, match="name"):
        data.fetch()
    with pytest.raises(ValueError, match="synthetic"):
        data.fetch("bone_implant")


def test_synthetic_entry_returns_data_and_ground_truth():
    image, labels = data.load("bone_implant", shape=(32, 32, 32), seed=3)
    assert image.shape == labels.shape == (32, 32, 32)
    again, _ = data.load("bone_implant", shape=(32, 32, 32), seed=3)
    np.testing.assert_array_equal(image, again)


# ----------------------------------------------------------------- readers
def test_read_tiff_file_and_folder(tmp_path):
    vol = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    tifffile.imwrite(tmp_path / "v.tif", vol)
    np.testing.assert_array_equal(data.read(tmp_path / "v.tif"), vol)
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, s in enumerate(vol):
        tifffile.imwrite(folder / f"s_{i:03d}.tif", s)
    np.testing.assert_array_equal(data.read(folder), vol)


def test_read_hdf5_nexus_default_and_data_exchange(tmp_path):
    f = tmp_path / "scan.nxs"
    with h5py.File(f, "w") as h:
        h.attrs["default"] = "entry"
        e = h.create_group("entry")
        e.attrs["default"] = "plot"
        g = e.create_group("plot")
        g.attrs["signal"] = "counts"
        g["counts"] = np.ones((3, 4, 5), np.float32)
    assert data.read(f).shape == (3, 4, 5)
    with pytest.raises(KeyError, match="dataset"):
        data.read(f, dataset="nope")
    de = tmp_path / "de.h5"
    with h5py.File(de, "w") as h:
        h["exchange/data"] = np.ones((4, 1, 8))
        h["exchange/data_white"] = np.ones((2, 1, 8))
        h["exchange/data_dark"] = np.zeros((2, 1, 8))
        h["exchange/theta"] = np.array([0, 45, 90, 135.0])
    d = data.read(de, reader="data_exchange", angles_unit="degrees")
    np.testing.assert_allclose(d.angles, np.deg2rad([0, 45, 90, 135]))
    with pytest.raises(ValueError, match="angles_unit"):
        data.read(de, reader="data_exchange")  # 0..135 "radians" looks like degrees


def test_read_zarr_and_npy(tmp_path):
    import zarr

    z = zarr.open(str(tmp_path / "v.zarr"), mode="w", shape=(4, 5, 6), dtype="f4")
    z[:] = 1.5
    assert data.read(tmp_path / "v.zarr").shape == (4, 5, 6)
    lazy = data.read(tmp_path / "v.zarr", as_numpy=False)
    assert not isinstance(lazy, np.ndarray)
    np.save(tmp_path / "a.npy", np.zeros(3))
    assert data.read(tmp_path / "a.npy").shape == (3,)


def test_corrupted_files_give_clear_errors(tmp_path):
    t = tmp_path / "broken.tif"
    t.write_bytes(b"II*\x00" + b"\x00" * 10)
    with pytest.raises(data.DataError, match="broken.tif: cannot be read as tiff"):
        data.read(t)
    h = tmp_path / "broken.h5"
    h.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(data.DataError, match="broken.h5"):
        data.read(h)
    with pytest.raises(FileNotFoundError, match="file"):
        data.read(tmp_path / "absent.tif")
    with pytest.raises(ValueError, match="file: cannot tell the format"):
        (tmp_path / "x.xyz").write_text("?")
        data.read(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match="reader"):
        data.read(tmp_path / "x.xyz", reader="bogus")


def test_sha256sum_matches_hashlib(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 1000)
    assert data.sha256sum(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


# ----------------------------------------------------------------- session 5 fixes
@pytest.mark.parametrize("kwargs", [{"imagej": True}, {}], ids=["imagej", "plain"])
def test_truncated_multipage_tiff_is_an_error_naming_the_file(tmp_path, kwargs):
    vol = (np.arange(20 * 30 * 40) % 60000).astype(np.uint16).reshape(20, 30, 40)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, vol, **kwargs)
    raw = full.read_bytes()
    np.testing.assert_array_equal(data.read(full), vol)
    for frac in (0.3, 0.6, 0.95):
        cut = tmp_path / f"cut_{int(frac * 100)}.tif"
        cut.write_bytes(raw[:int(len(raw) * frac)])
        with pytest.raises(data.DataError, match=rf"{cut.name}: cannot be read as tiff.*truncated"):
            data.read(cut)


def test_junk_tiff_is_a_data_error_naming_the_file(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(data.DataError, match="junk.tif: cannot be read as tiff"):
        data.read(junk)
    folder = tmp_path / "slices"
    folder.mkdir()
    tifffile.imwrite(folder / "s_0.tif", np.zeros((4, 4), np.uint8))
    (folder / "s_1.tif").write_bytes(b"junk")
    with pytest.raises(data.DataError, match="s_1.tif: cannot be read as tiff"):
        data.read(folder)


def test_folder_of_slices_is_sorted_naturally(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(12):  # unpadded numbers: text order would be s_0, s_1, s_10, s_11, s_2...
        tifffile.imwrite(folder / f"s_{i}.tif", np.full((3, 4), i, np.uint16))
    vol = data.read(folder)
    assert vol.shape == (12, 3, 4)
    assert [int(s[0, 0]) for s in vol] == list(range(12))


def test_download_mismatch_message_names_the_source_not_a_deleted_file(tmp_path, monkeypatch):
    _download_wrong_content(tmp_path, monkeypatch)
    entry = data.info("tomopy_tooth")
    with pytest.raises(data.DataError) as info:
        data.path("tomopy_tooth")
    msg = str(info.value)
    assert entry["source"]["url"] in msg and entry["sha256"] in msg
    assert hashlib.sha256(b"something else").hexdigest() in msg
    assert "nothing was kept" in msg
    assert ".partial" not in msg and "Delete it" not in msg
    assert not any(data.cache_dir().rglob("*download*"))
