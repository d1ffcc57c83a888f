"""The 3D output volume as OME-Zarr: the voxel size of the input store becomes the NGFF scale, the
metadata pass the ome-zarr-models validator, and the ome-zarr reader opens the image."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from tiny3d import NX, NY, NZ, make_tiny_store, tiny_config, tiny_prior

from engine.io.errors import InputError
from engine.io.hybrid_store import HybridStore, voxel_size_from_acquisition
from engine.io.ome_zarr import open_volume
from engine.recon.job3d import run_recon3d
from engine.runtime.bootstrap import init_distributed

pytestmark = pytest.mark.usefixtures("one_thread")

ome_zarr_models = pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (dev extra) is not installed")
ome_zarr_reader = pytest.importorskip("ome_zarr.reader", reason="ome-zarr (dev extra) is not installed")


def _with_voxel_size(store_path, voxel_size):
    """Set the store's acquisition attribute in place (as launch/prepare.py --voxel-size records it)."""
    group = zarr.open_group(store_path, mode="r+")
    attrs = dict(group.attrs["infusion_hybrid"])
    attrs["acquisition"] = {"voxel_size_mm": voxel_size}
    group.attrs["infusion_hybrid"] = attrs
    return store_path


def _reconstruct(store, out):
    run_recon3d(tiny_config(steps=2), store, out, init_distributed(device="cpu", env={}), prior=tiny_prior())
    return out


def _validated_image(path):
    """ome-zarr-models' NGFF 0.4 Image model of the group (raises if the metadata are invalid)."""
    from ome_zarr_models.v04 import Image

    group = zarr.open_group(path, mode="r")
    try:
        return Image.from_zarr(group)
    except Exception as error:  # ome-zarr-models 1.6 with pydantic >= 2.13 leaves its model unbuilt
        if "not fully defined" not in str(error):
            raise
        from pydantic_zarr.v2 import ArraySpec

        Image.model_rebuild(_types_namespace={"ArraySpec": ArraySpec})
        return Image.from_zarr(group)


def test_voxel_size_reaches_the_output_and_passes_ngff_validators(tmp_path):
    from ome_zarr.io import parse_url

    store = _with_voxel_size(make_tiny_store(tmp_path / "tiny.zarr"), [2.0, 1.0, 1.5])
    assert HybridStore(store).voxel_size_mm == (2.0, 1.0, 1.5)
    out = _reconstruct(store, tmp_path / "out.zarr")

    image = _validated_image(out)
    (multiscale,) = image.attributes.multiscales
    assert [(axis.name, axis.type, axis.unit) for axis in multiscale.axes] == [
        ("x", "space", "millimeter"), ("y", "space", "millimeter"), ("z", "space", "millimeter")]
    (dataset,) = multiscale.datasets
    assert dataset.path == "magnitude"
    assert [t.scale for t in dataset.coordinateTransformations] == [[2.0, 1.0, 1.5]]

    (node, *_) = list(ome_zarr_reader.Reader(parse_url(str(out)))())
    assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": [2.0, 1.0, 1.5]}]]
    assert [axis["unit"] for axis in node.metadata["axes"]] == ["millimeter"] * 3
    read = np.asarray(node.data[0])
    assert read.shape == (NX, NY, NZ)
    np.testing.assert_array_equal(read, open_volume(out).magnitude[...])
    assert open_volume(out).attrs["voxel_size_mm"] == [2.0, 1.0, 1.5]


def test_unknown_voxel_size_is_written_as_unit_free_voxels(tmp_path):
    out = _reconstruct(make_tiny_store(tmp_path / "tiny.zarr"), tmp_path / "out.zarr")
    (multiscale,) = _validated_image(out).attributes.multiscales
    assert [axis.unit for axis in multiscale.axes] == [None, None, None]  # not a made-up millimetre
    assert [t.scale for t in multiscale.datasets[0].coordinateTransformations] == [[1.0, 1.0, 1.0]]


def test_prepare_accepts_the_bundled_case_and_records_its_3_3_2_mm_voxels(tmp_path, capsys):
    from engine.io.examples import CASE_3D_PATH
    from launch.prepare import main as prepare

    assert prepare([str(CASE_3D_PATH), "--out", str(tmp_path / "bundled.zarr")]) == 0
    assert "voxel size: 3 x 3 x 2 mm" in capsys.readouterr().out
    assert HybridStore(tmp_path / "bundled.zarr").voxel_size_mm == (3.0, 3.0, 2.0)
    # the bundled case brings its own voxel size: a second one is refused, not silently ignored
    assert prepare(["--demo", "--out", str(tmp_path / "again.zarr"), "--voxel-size", "1", "1", "1"]) == 2
    assert "drop --maps, --mask and --voxel-size" in capsys.readouterr().err


def test_voxel_size_from_acquisition_attributes():
    grid = (4, 6, 8)
    assert voxel_size_from_acquisition({}, grid) is None
    assert voxel_size_from_acquisition({"recon_fov_mm": [8, 12, 20], "recon_matrix": [4, 6, 8]}, grid) == (2, 2, 2.5)
    assert voxel_size_from_acquisition({"recon_fov_mm": [8, 12, 20], "recon_matrix": [4, 6, 9]}, grid) is None
    with pytest.raises(InputError, match=r"case\.zarr: acquisition attribute voxel_size_mm must be 3 positive"):
        voxel_size_from_acquisition({"voxel_size_mm": [1, 0, 1]}, grid, "case.zarr")


def test_a_bundled_store_without_voxel_size_is_remade(tmp_path):
    """Stores cached in outputs/bundled by an engine that recorded no voxel size are remade on
    reuse, so the volume and montage get the true 3 x 3 x 2 mm instead of square voxels."""
    from engine.io.data import MulticoilData
    from engine.io.examples import bundled_case_3d, bundled_mask_3d, bundled_store_name
    from engine.io.hybrid_store import prepare_hybrid_store
    from engine.recon.config3d import BundledCaseConfig
    from engine.recon.job3d import prepare_bundled_store

    cfg = BundledCaseConfig()
    old = tmp_path / bundled_store_name(cfg.mask, cfg.acceleration, cfg.calib, cfg.chunk_x)
    case = bundled_case_3d()
    data = MulticoilData(kspace=case["kspace"], maps=case["maps"], reference=case["reference"], layout="3d",
                         source="older engine")
    prepare_hybrid_store(data, old, mask=bundled_mask_3d(cfg.mask, cfg.acceleration, cfg.calib), chunk_x=cfg.chunk_x)
    assert HybridStore(old).voxel_size_mm is None
    path = prepare_bundled_store(cfg, tmp_path, init_distributed(device="cpu", env={}))
    assert path == old and HybridStore(path).voxel_size_mm == (3.0, 3.0, 2.0)
