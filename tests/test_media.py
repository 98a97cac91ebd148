"""Image intake: real decoding, limits checked before decoding, content-addressed atomic storage."""

from __future__ import annotations

import io
import threading

import pytest
from conftest import huge_png_bytes, image_bytes, noise_image
from PIL import Image

from lvlm_studio.config import Settings
from lvlm_studio.media import ImageRejected, discard, ingest_image, load_image, pixel_id, stored_files


def test_jpeg_kept_as_is_and_stored_once(settings):
    data = image_bytes(1, "JPEG", (40, 30))
    rec = ingest_image(settings, data, name="cat.jpg", source_label="upload")
    assert rec.created and rec.width == 40 and rec.height == 30 and rec.format == "JPEG"
    assert rec.path.read_bytes() == data  # plain RGB JPEG: original bytes, no re-encoding loss
    assert rec.path.parent.name == rec.id[:2] and rec.path.name == f"{rec.id}.jpg"
    assert rec.path.is_relative_to(settings.images_dir)
    assert rec.id == pixel_id(Image.open(io.BytesIO(data)))  # id = hash of the decoded pixels
    again = ingest_image(settings, data, name="cat-copy.jpg")
    assert again.id == rec.id and not again.created
    assert len(stored_files(settings)) == 1


def test_same_pixels_in_another_container_share_the_id(settings, tmp_path):
    rec = ingest_image(settings, image_bytes(2, "JPEG"), name="a.jpg")
    png = io.BytesIO()
    load_image(rec.path).save(png, "PNG")  # lossless copy of the decoded JPEG (what exports embed)
    other = ingest_image(settings, png.getvalue(), name="a.png")
    assert other.id == rec.id and other.path == rec.path and not other.created


def test_conversions_to_rgb_png(settings):
    rgba = ingest_image(settings, image_bytes(3, "PNG", mode="RGBA"), name="alpha.png")
    assert rgba.format == "PNG" and load_image(rgba.path).mode == "RGB"
    transparent = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(transparent, "PNG")
    rec = ingest_image(settings, transparent.getvalue(), name="clear.png")
    assert load_image(rec.path).getpixel((0, 0)) == (255, 255, 255)  # alpha composited on white
    grey = ingest_image(settings, image_bytes(4, "PNG", mode="L"), name="grey.png")
    assert load_image(grey.path).mode == "RGB"
    gif = io.BytesIO()
    noise_image(5).convert("P").save(gif, "GIF")
    rec = ingest_image(settings, gif.getvalue(), name="anim.gif")
    assert rec.path.suffix == ".png" and Image.open(rec.path).format == "PNG"


def test_exif_orientation_applied(settings):
    im = noise_image(6, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", exif=exif)
    rec = ingest_image(settings, buffer.getvalue(), name="phone.jpg")
    assert (rec.width, rec.height) == (20, 40) and rec.format == "PNG"
    assert load_image(rec.path).size == (20, 40)


def test_rejections_name_the_file(settings, tmp_path):
    good = image_bytes(7, "JPEG", (64, 64))
    cases = {
        "empty.jpg": (b"", "empty file"),
        "text.png": (b"just some text, not a picture\n", "not a recognised image"),
        "cut.jpg": (good[: len(good) * 2 // 3], "truncated"),
        "header.png": (image_bytes(8, "PNG")[:30], "truncated or corrupt"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageRejected, match=reason) as info:
            ingest_image(settings, path)
        assert str(info.value).startswith(f"{name}: ")
    with pytest.raises(ImageRejected, match="file not found"):
        ingest_image(settings, tmp_path / "missing.jpg")
    assert stored_files(settings) == set()
    assert not list(settings.images_dir.rglob(".tmp-*"))


def _flat_png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_limits(home):
    small = Settings(home=home, max_pixels=10_000, max_side=300, max_file_bytes=20_000).ensure_dirs()
    with pytest.raises(ImageRejected, match="200x100 = 20,000 pixels exceeds the limit of 10,000"):
        ingest_image(small, _flat_png((200, 100)), name="big.png")
    with pytest.raises(ImageRejected, match="400x10 exceed the maximum side of 300"):
        ingest_image(small, _flat_png((400, 10)), name="wide.png")
    with pytest.raises(ImageRejected, match="over the limit"):
        ingest_image(small, image_bytes(9, "PNG", (90, 90)), name="heavy.png")  # ~24 KB of noise
    assert ingest_image(small, image_bytes(9, "PNG", (50, 50)), name="ok.png").width == 50


def test_decompression_bomb_refused_before_decoding(settings, tmp_path, monkeypatch):
    from PIL import ImageFile

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png_bytes(30000, 30000))
    assert bomb.stat().st_size < 1_000_000  # ~100 KB on disk, 900 megapixels when decoded
    with monkeypatch.context() as m:  # refused from the header: the pixels are never decoded
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the bomb's pixels were decoded"))
        with pytest.raises(ImageRejected, match="bomb.png: .*(pixels|maximum side)") as info:
            ingest_image(settings, bomb)
    assert "before decoding" in str(info.value) or "maximum side" in str(info.value)
    # Under Pillow's own cap but over ours: our limit, read from the header.
    bomb2 = tmp_path / "bomb2.png"
    bomb2.write_bytes(huge_png_bytes(8000, 6000))  # 48 MP > 40 MP default
    with pytest.raises(ImageRejected, match="8000x6000 = 48,000,000 pixels exceeds the limit of 40,000,000"):
        ingest_image(settings, bomb2)
    # Over twice Pillow's own cap Pillow refuses first: the message still quotes our limit, not Pillow's.
    bomb3 = tmp_path / "bomb3.png"
    bomb3.write_bytes(huge_png_bytes(100000, 100000))
    with pytest.raises(ImageRejected, match="10,000,000,000 pixels exceeds the limit of 40,000,000") as info:
        ingest_image(settings, bomb3)
    assert "178956970" not in str(info.value)


def test_concurrent_ingest_of_one_image_writes_one_file(settings):
    data = image_bytes(10, "PNG", (64, 64))
    results, errors = [], []

    def work():
        try:
            results.append(ingest_image(settings, data, name="same.png").id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    files = stored_files(settings)
    assert len(files) == 1 and not list(settings.images_dir.rglob(".tmp-*"))
    assert Image.open(next(iter(files))).size == (64, 64)


def test_load_image(settings):
    rec = ingest_image(settings, image_bytes(11, "PNG", (12, 8)), name="x.png")
    im = load_image(rec.path)
    assert im.mode == "RGB" and im.size == (12, 8)
    assert pixel_id(im) == rec.id


DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["corrupt_missing_dimensions.tif", "corrupt_overflow.tif"])
def test_corrupt_tiffs_found_by_fuzzing_are_refused(settings, name):
    """Two byte-flipped TIFFs from a fuzzing run: Pillow opens their headers, then raises TypeError
    ("Missing dimensions", from n_frames) and OverflowError (from load). Both must be a refusal
    that names the file, with nothing stored."""
    with pytest.raises(ImageRejected, match=f"^{name}: truncated or corrupt image data"):
        ingest_image(settings, DATA / name)
    assert stored_files(settings) == set()


def _gradient(mode: str, values) -> bytes:
    import numpy as np

    arr = np.asarray(values).reshape(16, 16)
    buffer = io.BytesIO()
    im = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    im.save(buffer, "PNG" if mode == "I;16" else "TIFF")
    return buffer.getvalue()


def test_high_bit_depth_greyscale_is_scaled_not_clipped(settings):
    """Pillow's convert("RGB") clips 16-bit and float greyscale: a 0..65535 gradient becomes 0 then
    255 everywhere, a [0, 1] float image all black. Intake scales them instead."""
    import numpy as np

    cases = {
        "sixteen.png": (_gradient("I;16", np.linspace(0, 65535, 256)), (0, 255)),
        "float.tif": (_gradient("F", np.linspace(0.0, 1.0, 256)), (0, 255)),
        "signed.tif": (_gradient("I", np.linspace(-1000, 3000, 256)), (0, 255)),
        "wide.tif": (_gradient("I", np.linspace(0, 4000, 256)), (0, 255)),  # above 255 only: stretched too
    }
    for name, (data, (lo, hi)) in cases.items():
        rec = ingest_image(settings, data, name=name)
        grey = np.asarray(load_image(rec.path))[..., 0].ravel()
        assert (int(grey.min()), int(grey.max())) == (lo, hi), name
        assert len(np.unique(grey)) > 200, f"{name}: {len(np.unique(grey))} levels left"
        assert np.all(np.diff(grey.astype(int)) >= 0), f"{name}: the gradient is not monotone"


# --- Gaps found by a mutation audit of lvlm_studio/media.py -------------------------------------


def test_limits_are_inclusive(home, tmp_path):
    """A file of exactly max_file_bytes, a side of exactly max_side and exactly max_pixels pixels
    are accepted; one byte more is refused (from a path, checked before reading, and from bytes)."""
    data = _flat_png((100, 100))
    path = tmp_path / "exact.png"
    path.write_bytes(data)
    exact = Settings(home=home, max_pixels=10_000, max_side=100, max_file_bytes=len(data)).ensure_dirs()
    assert ingest_image(exact, path).width == 100
    assert ingest_image(exact, data, name="exact.png").height == 100
    tight = Settings(home=home, max_file_bytes=len(data) - 1).ensure_dirs()
    for source in (path, data):
        with pytest.raises(ImageRejected, match="over the limit"):
            ingest_image(tight, source, name="exact.png")


def test_non_images_and_other_formats_are_refused(settings, tmp_path):
    # a directory is not an image file
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageRejected, match="^folder: not a regular file"):
        ingest_image(settings, tmp_path / "folder")
    # formats Pillow reads but intake does not accept (a smaller attack surface)
    for fmt in ("PPM", "ICO", "TGA"):
        buffer = io.BytesIO()
        noise_image(12, (16, 16)).save(buffer, fmt)
        with pytest.raises(ImageRejected, match="not a recognised image"):
            ingest_image(settings, buffer.getvalue(), name=f"x.{fmt.lower()}")
    # a cut WEBP is named as such, not as "not an image"
    webp = io.BytesIO()
    noise_image(13, (16, 16)).save(webp, "WEBP")
    with pytest.raises(ImageRejected, match="truncated or corrupt WEBP"):
        ingest_image(settings, webp.getvalue()[:12], name="cut.webp")
    assert stored_files(settings) == set()


def test_every_kind_of_transparency_is_composited_on_white(settings):
    grey_alpha = io.BytesIO()
    Image.new("LA", (4, 4), (0, 0)).save(grey_alpha, "PNG")  # black, fully transparent
    palette = io.BytesIO()
    Image.new("P", (4, 4), 0).save(palette, "PNG", transparency=0)  # palette index 0 (black) transparent
    for name, data in (("la.png", grey_alpha.getvalue()), ("palette.png", palette.getvalue())):
        rec = ingest_image(settings, data, name=name)
        assert load_image(rec.path).getpixel((0, 0)) == (255, 255, 255), name


def test_converted_images_are_stored_as_single_frame_rgb(settings):
    """Anything that is not a plain single-frame RGB JPEG/PNG is re-encoded: the stored file itself
    is RGB (not only what load_image returns) and holds the one frame its id was computed from."""
    frames = [noise_image(14 + k, (16, 16)) for k in range(2)]
    animated = io.BytesIO()
    frames[0].save(animated, "PNG", save_all=True, append_images=frames[1:])  # an APNG, mode RGB
    cases = {
        "alpha.png": image_bytes(15, "PNG", mode="RGBA"),
        "grey.png": image_bytes(16, "PNG", mode="L"),
        "grey.jpg": image_bytes(17, "JPEG", mode="L"),
        "animated.png": animated.getvalue(),
    }
    for name, data in cases.items():
        rec = ingest_image(settings, data, name=name)
        with Image.open(rec.path) as stored:
            assert stored.mode == "RGB" and getattr(stored, "n_frames", 1) == 1, name
    assert ingest_image(settings, animated.getvalue(), name="a.png").id == pixel_id(frames[0])


def _jpeg_scan(data: bytes) -> bytes:
    """A JPEG's compressed pixel data: from its start-of-scan marker to the end of the picture."""
    start = data.index(b"\xff\xda")
    return data[start:data.index(b"\xff\xd9", start) + 2]


def test_exif_orientation_one_keeps_the_compressed_pixels(settings):
    exif = Image.Exif()
    exif[0x0112] = 1  # "normal": nothing to rotate, so nothing to re-encode
    buffer = io.BytesIO()
    noise_image(18, (40, 20)).save(buffer, "JPEG", exif=exif)
    rec = ingest_image(settings, buffer.getvalue(), name="upright.jpg")
    stored = rec.path.read_bytes()
    assert rec.format == "JPEG" and _jpeg_scan(stored) == _jpeg_scan(buffer.getvalue())
    assert len(stored) < len(buffer.getvalue()) and not Image.open(rec.path).getexif()


def test_photo_metadata_is_not_stored_and_the_pixels_are_kept_byte_for_byte(settings):
    """A photo's EXIF (GPS position, camera serial), XMP and comments would travel into every export:
    they are dropped without re-encoding; the colour profile stays."""
    exif = Image.Exif()
    exif[0x8825] = {2: (48.0, 51.0, 29.0), 4: (2.0, 17.0, 40.0)}  # GPS latitude / longitude
    exif[0xA431] = "SERIAL-12345"  # body serial number
    icc = b"\x00\x00\x02\x0cICC-profile-bytes" + bytes(500)
    buffer = io.BytesIO()
    noise_image(31, (48, 32)).save(buffer, "JPEG", exif=exif, icc_profile=icc, comment=b"shot at home")
    data = buffer.getvalue()
    assert b"SERIAL-12345" in data and b"shot at home" in data
    rec = ingest_image(settings, data, name="photo.jpg")
    stored = rec.path.read_bytes()
    assert rec.format == "JPEG" and rec.id == pixel_id(Image.open(io.BytesIO(data)))
    assert b"SERIAL-12345" not in stored and b"shot at home" not in stored and b"Exif" not in stored
    assert _jpeg_scan(stored) == _jpeg_scan(data)  # no re-encoding loss
    with Image.open(rec.path) as im:
        assert not im.getexif() and im.info.get("icc_profile") == icc
    # A PNG's EXIF and text chunks (XMP lives in iTXt) go too; the pixels are the same picture.
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Author", "Jane Doe, 12 Home Street")
    text.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPS 48.86</x:xmpmeta>")
    png = io.BytesIO()
    noise_image(32, (30, 30)).save(png, "PNG", pnginfo=text, exif=exif)
    rec = ingest_image(settings, png.getvalue(), name="photo.png")
    stored = rec.path.read_bytes()
    assert rec.format == "PNG" and b"Jane Doe" not in stored and b"xmpmeta" not in stored
    assert b"SERIAL-12345" not in stored and len(stored) < len(png.getvalue())
    assert rec.id == pixel_id(Image.open(io.BytesIO(png.getvalue()))) == pixel_id(Image.open(rec.path))


def test_a_phones_multi_picture_jpeg_keeps_its_first_picture_as_a_jpeg(settings):
    """Phones write MPO (the photo plus a preview or depth picture), which Pillow opens as two
    frames: it was stored as a PNG several times its size."""
    first, second = noise_image(33, (64, 48)), noise_image(34, (64, 48))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    rec = ingest_image(settings, data, name="phone.jpg")
    assert rec.format == "JPEG" and rec.path.suffix == ".jpg" and len(rec.path.read_bytes()) < len(data)
    with Image.open(rec.path) as im:
        assert im.format == "JPEG" and getattr(im, "n_frames", 1) == 1
        assert pixel_id(im) == rec.id == pixel_id(Image.open(io.BytesIO(data)))  # the first picture


def test_stripped_bytes_that_decode_to_another_picture_are_not_stored(settings, monkeypatch):
    """The walker's output must decode to the same pixels; if it did not, the image is stored as a
    PNG re-encoded from the original, under the original's id."""
    from lvlm_studio import media

    data = image_bytes(37, "JPEG", (24, 24))
    monkeypatch.setattr(media, "strip_metadata", lambda raw, fmt: image_bytes(38, "JPEG", (24, 24)))
    rec = ingest_image(settings, data, name="odd.jpg")
    assert rec.format == "PNG" and rec.id == pixel_id(Image.open(io.BytesIO(data)))
    assert pixel_id(Image.open(rec.path)) == rec.id and (rec.width, rec.height) == (24, 24)


def test_float_and_32_bit_greyscale_keep_the_ids_they_were_stored_under():
    """The in-place conversion gives the very pixels the earlier, copying one gave (float64 both):
    an image stored before keeps its id when it arrives again."""
    import numpy as np

    from lvlm_studio.media import _high_depth_to_rgb

    def earlier(im):  # the conversion as it was written before (one copy per step)
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo < 0.0 or hi > 255.0:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")

    rng = np.random.default_rng(5)
    grid = np.linspace(0.0, 1.0, 300 * 300).reshape(300, 300)  # float32 arithmetic rounds ~11k of these otherwise
    wide = rng.integers(-(2**31), 2**31 - 1, (300, 300))
    for values in (grid, wide, rng.random((300, 300)), rng.normal(0, 1000, (300, 300)), rng.uniform(0, 255, (300, 300))):
        for mode, dtype in (("F", np.float32), ("I", np.int32)):
            im = Image.fromarray(values.astype(dtype), mode=mode)
            assert _high_depth_to_rgb(im).tobytes() == earlier(im).tobytes(), mode


def test_a_file_the_metadata_walker_cannot_follow_is_not_kept_as_it_is():
    from lvlm_studio.media import strip_metadata

    data = image_bytes(35, "JPEG", (20, 20))
    assert strip_metadata(data, "JPEG") == data  # nothing to drop: the same bytes
    assert strip_metadata(data[:40], "JPEG") is None  # cut inside its headers
    assert strip_metadata(b"\xff\xd8\xff\xe1\x00\x01", "JPEG") is None  # a length below its own 2 bytes
    png = image_bytes(36, "PNG", (20, 20))
    assert strip_metadata(png, "PNG") == png and strip_metadata(png[:-8], "PNG") is None


def test_stored_images_are_found_again_whatever_their_format(settings):
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        data = image_bytes(19, fmt, (20, 20))
        first = ingest_image(settings, data, name=f"a{suffix}")
        again = ingest_image(settings, data, name=f"b{suffix}")
        assert first.created and not again.created
        assert again.path == first.path and again.path.suffix == suffix and again.format == fmt
    assert len(stored_files(settings)) == 2


def test_the_id_depends_on_the_shape_not_only_the_bytes(settings):
    im = noise_image(20, (6, 4))
    same_bytes = Image.frombytes("RGB", (4, 6), im.tobytes())
    assert pixel_id(im) != pixel_id(same_bytes)
    a = ingest_image(settings, _png(im), name="wide.png")
    b = ingest_image(settings, _png(same_bytes), name="tall.png")
    assert a.id != b.id and b.created and len(stored_files(settings)) == 2


def _png(im: Image.Image) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    return buffer.getvalue()


def test_sixteen_bit_copy_of_an_eight_bit_image_has_its_id(settings):
    """A 16-bit PNG written from an 8-bit one (v * 257, what converters do) decodes back to the same
    pixels, hence the same id: 16-bit scaling maps 257·v exactly onto v."""
    import numpy as np

    grey = noise_image(21, (16, 16), "L")
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    eight = ingest_image(settings, _png(grey), name="eight.png")
    sixteen = ingest_image(settings, _png(wide), name="sixteen.png")
    assert sixteen.id == eight.id and not sixteen.created


def test_discard_removes_only_a_file_this_call_wrote(settings):
    data = image_bytes(22, "PNG")
    first = ingest_image(settings, data, name="a.png")
    again = ingest_image(settings, data, name="b.png")
    discard(again)  # the file existed before this call: another record may point at it
    assert first.path.is_file()
    discard(first)
    assert not first.path.exists()


def test_stored_files_ignores_temporary_files(settings):
    rec = ingest_image(settings, image_bytes(23, "PNG"), name="a.png")
    (rec.path.parent / f".tmp-{rec.path.name}-abc").write_bytes(b"partial write")
    assert stored_files(settings) == {rec.path.resolve()}


def test_unreadable_paths_and_a_limit_above_pillows_are_named(settings, tmp_path):
    """A path too long for the OS is this file's refusal (it used to raise OSError out of an import);
    a limit set above Pillow's own cap names the cap that refused the image, not ours."""
    with pytest.raises(ImageRejected, match=r"cannot read the file \(File name too long\)") as info:
        ingest_image(settings, tmp_path / ("x" * 5000 + ".png"))
    assert len(str(info.value)) < 300
    generous = Settings(home=settings.home, max_pixels=10**12)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png_bytes(100000, 100000))
    cap = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected, match=f"10,000,000,000 pixels exceeds the limit of {cap:,} .Pillow's own cap"):
        ingest_image(generous, bomb)


def test_the_pixel_limit_variable_is_checked_by_name(home, monkeypatch):
    monkeypatch.setenv("LVLM_STUDIO_MAX_PIXELS", " 50_000_000 ")
    assert Settings().max_pixels == 50_000_000
    for bad in ("abc", "0", "-5", "1.5"):
        monkeypatch.setenv("LVLM_STUDIO_MAX_PIXELS", bad)
        with pytest.raises(ValueError, match=f"LVLM_STUDIO_MAX_PIXELS must be a positive whole number .*'{bad}'"):
            Settings()


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    import struct

    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_markers(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, first bytes of its payload) of each segment before the first scan."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append((data[pos + 1], data[pos + 4:pos + 4 + min(length - 2, 12)]))
        pos += 2 + length
    return out


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_chunks(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


def test_jpeg_keeps_only_the_segments_needed_to_decode_and_display(settings):
    """An allow-list, not a list of known metadata: C2PA credentials (APP11, with a GPS position),
    APP12 "Ducky", a maker's APP3 and a JFIF thumbnail (an uncropped preview) went through before;
    the colour profile, the Adobe transform flag and the compressed pixels stay as they were."""
    icc = b"\x00\x00\x02\x0cICC-profile-bytes" + bytes(200)
    buffer = io.BytesIO()
    noise_image(61, (40, 24)).save(buffer, "JPEG", icc_profile=icc)
    plain = buffer.getvalue()
    assert plain[2:4] == b"\xff\xe0"  # Pillow's JFIF segment first
    jfif_len = int.from_bytes(plain[4:6], "big")
    jfif = plain[6:6 + jfif_len - 2]
    thumbnail = jfif[:12] + b"\x02\x01" + b"THUMB!"  # a 2x1 RGB thumbnail
    c2pa = b"JP\x00\x00c2pa {\"exif:GPSLatitude\": \"48,51.4N\", \"tiff:Make\": \"Pixel\"}"
    extra = (_jpeg_segment(0xEB, c2pa) + _jpeg_segment(0xEC, b"Ducky SERIAL=123")
             + _jpeg_segment(0xE3, b"MAKER GPS 48.86") + _jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")
             + _jpeg_segment(0xFE, b"a comment") + _jpeg_segment(0xE0, b"JFXX\x00\x10THUMB2"))
    data = plain[:2] + _jpeg_segment(0xE0, thumbnail) + extra + plain[6 + jfif_len - 2:]
    rec = ingest_image(settings, data, name="credentials.jpg")
    stored = rec.path.read_bytes()
    assert rec.format == "JPEG" and rec.id == pixel_id(Image.open(io.BytesIO(plain)))
    for secret in (b"GPSLatitude", b"SERIAL", b"MAKER", b"a comment", b"THUMB"):
        assert secret not in stored, secret
    markers = _jpeg_markers(stored)
    apps = [(m, head) for m, head in markers if 0xE0 <= m <= 0xEF or m == 0xFE]
    assert sorted(m for m, _ in apps) == [0xE0, 0xE2, 0xEE]  # JFIF, ICC profile, Adobe: nothing else
    assert apps[0][1] == jfif[:12] and stored[4:6] == b"\x00\x10"  # the JFIF header, its thumbnail 0x0
    assert _jpeg_scan(stored) == _jpeg_scan(plain)  # no re-encoding
    assert {m for m, _ in markers} >= {0xDB, 0xC0, 0xC4}  # the tables and the frame
    with Image.open(rec.path) as im:
        assert im.info.get("icc_profile") == icc and im.info.get("adobe_transform") == 1


def test_png_keeps_only_critical_and_rendering_chunks(settings):
    """C2PA (caBX), a private chunk, EXIF and text go; the chunks that change how the picture looks
    (gamma, colour primaries, sRGB intent, significant bits, pixel aspect) stay, and the pixels
    are the same bytes."""
    buffer = io.BytesIO()
    noise_image(62, (20, 16)).save(buffer, "PNG", dpi=(72, 72))
    plain = buffer.getvalue()
    ihdr_end = 8 + 25
    rendering = (_png_chunk(b"gAMA", (45455).to_bytes(4, "big")) + _png_chunk(b"sRGB", b"\x00")
                 + _png_chunk(b"cHRM", bytes(32)) + _png_chunk(b"sBIT", b"\x08\x08\x08"))
    private = (_png_chunk(b"caBX", b'{"exif:GPSLatitude": "48,51.4N"}') + _png_chunk(b"prVt", b"SERIAL=123")
               + _png_chunk(b"tEXt", b"Author\x00Jane Doe") + _png_chunk(b"eXIf", b"MM\x00*GPS"))
    data = plain[:ihdr_end] + rendering + private + plain[ihdr_end:]
    rec = ingest_image(settings, data, name="credentials.png")
    stored = rec.path.read_bytes()
    assert rec.format == "PNG" and rec.id == pixel_id(Image.open(io.BytesIO(plain)))
    assert b"GPSLatitude" not in stored and b"SERIAL" not in stored and b"Jane" not in stored
    kinds = _png_chunks(stored)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert {b"caBX", b"prVt", b"tEXt", b"eXIf"}.isdisjoint(kinds)
    assert {b"gAMA", b"sRGB", b"cHRM", b"sBIT", b"pHYs"} <= set(kinds)
    assert plain[plain.index(b"IDAT") - 4:plain.index(b"IEND") - 4] in stored  # pixel data byte for byte
