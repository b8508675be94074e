"""fnl-predict and the one image reader on real-world inputs: phone photos with EXIF orientation, damaged and empty
files, 16-bit and float images, images sharing a name, and files that are not images."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fnl.cli.predict import main
from fnl.config import load_config
from fnl.data import DatasetError
from fnl.data.images import ImageReadError, load_image
from fnl.data.mapper import read_image
from fnl.engine.checkpoint import save_checkpoint
from fnl.modeling import build_model

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("test_tiny", SMALL)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", build_model(cfg).eval(), cfg)


def predict(checkpoint, input_path, output) -> int:
    return main(["--ckpt", str(checkpoint), "--input", str(input_path), "--output", str(output)])


def photo(width: int = 80, height: int = 48, seed: int = 0) -> np.ndarray:
    """A picture whose left third is red, so that a rotation shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, : width // 3] = (255, 0, 0)
    return pixels


def save_phone_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)


def png_16bit(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (gray for (H, W), RGB for (H, W, 3)), written by hand: Pillow cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# 1. EXIF orientation

def test_the_reader_turns_a_phone_portrait_upright(tmp_path):
    pixels = photo(80, 48)
    save_phone_jpeg(tmp_path / "portrait.jpg", pixels, orientation=6)  # stored landscape, shown rotated 90 deg CW
    image = load_image(tmp_path / "portrait.jpg")
    assert image.size == (48, 80)
    upright = np.asarray(image, dtype=np.int64)
    # The stored left third (red) is the top third once upright.
    assert upright[:20, :, 0].mean() > 240 and upright[:20, :, 1:].mean() < 15


def test_predict_on_a_rotated_phone_photo(checkpoint, tmp_path, capsys):
    save_phone_jpeg(tmp_path / "portrait.jpg", photo(80, 48), orientation=6)
    assert predict(checkpoint, tmp_path / "portrait.jpg", tmp_path / "out") == 0
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (document["images"][0]["width"], document["images"][0]["height"]) == (48, 80)
    with Image.open(tmp_path / "out" / "portrait_jpg_densepose.png") as overlay:
        assert overlay.size == (48, 80)


def test_the_data_loader_reads_the_same_upright_image(tmp_path):
    save_phone_jpeg(tmp_path / "portrait.jpg", photo(80, 48), orientation=6)
    record = {"file_name": str(tmp_path / "portrait.jpg"), "image_id": 3, "height": 80, "width": 48}
    assert np.array_equal(np.asarray(read_image(record)), np.asarray(load_image(tmp_path / "portrait.jpg")))


# 2. Damaged and empty files

def test_bad_files_are_reported_skipped_and_listed(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photo(seed=1)).save(images / "a_good.jpg", quality=95)
    whole = (images / "a_good.jpg").read_bytes()
    (images / "b_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "c_empty.jpg").write_bytes(b"")
    (images / "d_text.png").write_text("not a picture")
    Image.fromarray(photo(seed=2)).save(images / "e_good.png")
    code = predict(checkpoint, images, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["file_name"] for r in document["images"]] == [str(images / "a_good.jpg"), str(images / "e_good.png")]
    failed = {f["file_name"].rsplit("/", 1)[1]: f["error"] for f in document["failed"]}
    assert set(failed) == {"b_truncated.jpg", "c_empty.jpg", "d_text.png"}
    assert "truncated" in failed["b_truncated.jpg"] and failed["c_empty.jpg"] == "an empty file"
    assert failed["d_text.png"] == "not an image Pillow can read"
    skipped = [line for line in err.splitlines() if line.startswith("fnl-predict: skipped image ")]
    assert len(skipped) == 3 and all(str(images) in line for line in skipped)
    assert "Traceback" not in err and "3 of 5 image(s) could not be read" in err


# 3. High bit depth

def test_16bit_gray_and_rgb_are_scaled_not_clipped(tmp_path):
    gray = np.array([[0, 257, 30000, 65535]] * 3, dtype=np.uint16)
    (tmp_path / "gray16.png").write_bytes(png_16bit(gray))
    assert np.asarray(load_image(tmp_path / "gray16.png"))[0, :, 0].tolist() == [0, 1, 117, 255]
    rgb = np.zeros((3, 4, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1000, 30000, 65535
    (tmp_path / "rgb16.png").write_bytes(png_16bit(rgb))
    assert np.asarray(load_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [3, 117, 255]


def test_float_images_in_0_1_are_scaled_and_others_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert np.asarray(load_image(tmp_path / "unit.tif"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 3.5, 700.0]], dtype=np.float32)).save(tmp_path / "radiance.tif")
    with pytest.raises(ImageReadError, match=r"radiance.tif: float pixels range 0..700, outside the 0..1"):
        load_image(tmp_path / "radiance.tif")
    record = {"file_name": str(tmp_path / "radiance.tif"), "image_id": 9, "height": 1, "width": 3}
    with pytest.raises(DatasetError, match=r"image 9 \(.*radiance.tif\): float pixels range 0..700"):
        read_image(record)


def test_integer_pixels_beyond_16_bits_are_refused(tmp_path):
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "deep.tif")
    with pytest.raises(ImageReadError, match=r"deep.tif: 32-bit integer pixels range 0..70000, beyond 16 bits"):
        load_image(tmp_path / "deep.tif")


# 4. Unique output names

def test_images_sharing_a_name_get_their_own_outputs(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    Image.fromarray(photo(seed=1)).save(images / "astronaut.jpg", quality=95)
    Image.fromarray(photo(seed=2)).save(images / "astronaut.png")
    Image.fromarray(photo(seed=3)).save(images / "nested" / "astronaut.jpg", quality=95)
    output = tmp_path / "out"
    assert predict(checkpoint, images, output) == 0
    document = json.loads((output / "results.json").read_text())
    overlays = [r["overlay"] for r in document["images"]]
    assert overlays == ["astronaut_jpg_densepose.png", "astronaut_png_densepose.png",
                        "nested/astronaut_jpg_densepose.png"]
    assert all((output / name).is_file() for name in overlays)
    assert all((output / r["iuv"]).is_file() for r in document["images"])
    assert "wrote 3 overlay(s)" in capsys.readouterr().out


# 5. Files that are not images

def test_files_that_are_not_images_are_reported_once(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photo()).save(images / "person.png")
    (images / "notes.txt").write_text("shot on a phone")
    (images / "labels.json").write_text("{}")
    assert predict(checkpoint, images, tmp_path / "out") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "not images" in line]
    assert lines == ["fnl-predict: skipping 2 file(s) that are not images (.jpg, .jpeg, .png, .bmp, .webp, .tif, "
                     ".tiff): labels.json, notes.txt"]
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert document["not_images"] == [str(images / "labels.json"), str(images / "notes.txt")]
