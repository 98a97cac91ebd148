"""Image intake: validate by really decoding, enforce limits, store content-addressed files.

Identity: an image's id is the SHA-256 of its decoded RGB pixels (``b"RGB <w>x<h>\\n"`` + raw
bytes), not of the file. The same picture therefore has one id whether it arrives as the original
JPEG, as the PNG an export embedded, or from an HF dataset; exports round-trip to the same ids.

Stored file: ``images/<id[:2]>/<id>.<ext>``. A plain RGB JPEG or PNG that needs no change keeps
its compressed pixel data byte for byte (no re-encoding loss, no size blow-up), and of the rest
only what decoding and displaying the picture needs (an allow-list: see ``strip_metadata``); EXIF
with a GPS position or a camera serial, XMP, C2PA credentials, text chunks and any other metadata
would travel into every export, and are dropped. A phone's multi-picture JPEG (MPO) keeps its first
picture. Anything else (palette,
alpha, grey, 16-bit, EXIF-rotated, GIF/WebP/BMP/TIFF) is converted to RGB and stored as PNG. Alpha is composited onto white. The write is atomic (temporary file + rename), and an image
already stored (same pixels) is not written again.

Checks, in order, each failing with an :class:`ImageRejected` that names the file: missing or
empty file, file larger than ``Settings.max_file_bytes``, not a supported image format, width or
height above ``Settings.max_side``, more than ``Settings.max_pixels`` pixels (read from the header
*before* any pixel is decoded: the decompression-bomb guard), then truncated or corrupt pixel data
(a full decode).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lvlm_studio.config import Settings

# Formats a browser or a dataset plausibly holds; Pillow's rarer plugins (EPS, PSD, ...) are a
# larger attack surface for no gain here.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_KEEP_AS_IS = {"JPEG": ".jpg", "PNG": ".png"}


class ImageRejected(ValueError):
    """An image that cannot be accepted; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        shown = name if len(name) <= 160 else f"{name[:100]}…{name[-40:]}"  # a pathological name stays readable
        super().__init__(f"{shown}: {reason}")


@dataclass(frozen=True)
class ImageRecord:
    """A stored image. ``created`` is True when this call wrote the file."""

    id: str
    path: Path
    width: int
    height: int
    source: str = "upload"
    format: str = "PNG"
    created: bool = False
    # A damaged file of the same picture that this one was written to replace, in another format:
    # removed by the caller once the row names the new file (io.stored_image), not before.
    replaces: Path | None = None


def _human(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _read_source(source: Path | str | bytes, name: str, limit: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        size = len(data)
    else:
        path = Path(source)
        try:
            if not path.exists():
                raise ImageRejected(name, "file not found")
            if not path.is_file():
                raise ImageRejected(name, "not a regular file")
            size = path.stat().st_size
            if size > limit:  # refuse before reading it into memory
                raise ImageRejected(name, f"file is {_human(size)}, over the limit of {_human(limit)}")
            data = path.read_bytes()
        except OSError as exc:  # a name too long, no permission, an I/O error: this file alone
            raise ImageRejected(name, f"cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageRejected(name, "empty file (0 bytes)")
    if size > limit:
        raise ImageRejected(name, f"file is {_human(size)}, over the limit of {_human(limit)}")
    return data


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    """The format a file's magic bytes claim, to tell 'truncated PNG' from 'not an image'."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)


def _open_checked(data: bytes, name: str, settings: Settings) -> Image.Image:
    """Open (header only) and enforce the size limits before decoding any pixel."""
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's warning; Pillow still raises for > 2x its cap.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            # Pillow's message quotes its own cap; the limit that applies here is ours.
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels" if found else "the image's pixel count"
            # Pillow refuses above twice its own cap whatever ours is: name the limit that applied.
            pillow_cap = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            limit = min(settings.max_pixels, pillow_cap) if pillow_cap else settings.max_pixels
            whose = "" if limit == settings.max_pixels else " (Pillow's own cap, below LVLM_STUDIO_MAX_PIXELS)"
            raise ImageRejected(
                name, f"{size} exceeds the limit of {limit:,}{whose} "
                "(decompression-bomb guard; refused before decoding)"
            ) from exc
        except UnidentifiedImageError as exc:
            kind = _sniff(data)
            if kind is not None:
                raise ImageRejected(name, f"truncated or corrupt {kind} file (header unreadable)") from exc
            raise ImageRejected(
                name, f"not a recognised image (accepted formats: {', '.join(ACCEPTED_FORMATS)})"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many kinds on corrupt headers
            raise ImageRejected(name, f"truncated or corrupt image header ({type(exc).__name__}: {exc})") from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageRejected(name, f"invalid dimensions {width}x{height}")
    if max(width, height) > settings.max_side:
        raise ImageRejected(
            name, f"dimensions {width}x{height} exceed the maximum side of {settings.max_side} px"
        )
    if width * height > settings.max_pixels:
        raise ImageRejected(
            name,
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {settings.max_pixels:,} "
            "(decompression-bomb guard; refused before decoding)",
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _high_depth_to_rgb(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 8-bit RGB by scaling, not clipping (Pillow's own
    convert clips: a 0..65535 gradient would become 0 then 255 everywhere)."""
    import numpy as np

    raw = np.asarray(im)
    if im.mode.startswith("I;16"):  # the full 16-bit range onto 0..255, in integers (no float copy)
        scaled = (raw.astype(np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    # One float64 array, worked in place (the copies of each step took ~1 GB for a 40 MP upload).
    # float64 as before: the same picture keeps the id it was stored under.
    a = raw.astype(np.float64)
    np.nan_to_num(a, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a *= 255.0  # a float image in [0, 1]
    elif lo < 0.0 or hi > 255.0:
        if hi > lo:  # any other range: stretch
            a -= lo
            a *= 255.0 / (hi - lo)
        else:
            a[...] = 0.0
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")


# What a stored JPEG or PNG keeps besides its pixel data: an allow-list, so metadata in a segment or
# chunk nobody listed (C2PA credentials in JPEG APP11 or PNG caBX, APP12 "Ducky", a camera maker's
# APPn block, JPEG comments, PNG text) cannot slip through into the store and every export.
#
# JPEG: the frame, table and scan markers the decoder reads (SOF0-15 except the reserved JPG
# marker 0xC8, DHT 0xC4, DAC 0xCC, DQT, DNL, DRI, DHP, EXP; SOS), restart markers, and three
# application segments that change how the pixels decode or look: APP0 "JFIF" (its embedded
# thumbnail dropped: an uncropped preview of the picture), APP2 "ICC_PROFILE" (colours) and APP14
# "Adobe" (whether the components are YCbCr or RGB).
_JPEG_KEEP = (set(range(0xC0, 0xD0)) - {0xC8}) | {0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF}
_JPEG_KEEP_APP = {0xE0: b"JFIF\x00", 0xE2: b"ICC_PROFILE\x00", 0xEE: b"Adobe"}
# PNG: every critical chunk (upper-case first letter: IHDR, PLTE, IDAT, IEND; a decoder must read
# them) and the ancillary chunks that change how the picture renders: transparency (tRNS) and its
# background (bKGD), colour and gamma (gAMA, cHRM, sRGB, iCCP, cICP and its HDR companions
# mDCV / cLLI, under either spelling of the drafts), the significant bits (sBIT) and the pixel
# aspect ratio (pHYs). None of them holds text.
_PNG_KEEP = {b"tRNS", b"bKGD", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"cICP", b"mDCV", b"mDCv", b"cLLI",
             b"cLLi", b"sBIT", b"pHYs"}


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """``data`` (a JPEG, a phone's MPO, or a PNG) reduced to what decoding and displaying it needs,
    losslessly: the pixel data is copied byte for byte, every segment or chunk outside the
    allow-list above is dropped, and an MPO ends after its first (primary) picture. None when the
    file's structure is not what the walker expects."""
    try:
        return _strip_png(data) if fmt == "PNG" else _strip_jpeg(data)
    except (IndexError, ValueError):
        return None


def _jpeg_segment_kept(marker: int, segment: bytes) -> bytes | None:
    """The segment as stored (``segment`` is the marker, its length and its payload), or None when
    the allow-list drops it."""
    if marker in _JPEG_KEEP:
        return segment
    signature = _JPEG_KEEP_APP.get(marker)
    if signature is None or not segment[4:].startswith(signature):
        return None
    if marker == 0xE0 and len(segment) > 18:  # JFIF with a thumbnail: keep its 14-byte header, 0x0 thumbnail
        return b"\xff\xe0\x00\x10" + segment[4:16] + b"\x00\x00"
    return segment


def _strip_jpeg(data: bytes) -> bytes | None:
    if data[:2] != b"\xff\xd8":
        return None
    out, pos = bytearray(b"\xff\xd8"), 2
    while True:
        if data[pos] != 0xFF:
            return None
        while data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the first picture ends here (an MPO's others follow)
            out += b"\xff\xd9"
            return bytes(out)
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            out += data[pos:pos + 2]
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        end = pos + 2 + length
        segment = data[pos:end]
        if len(segment) != 2 + length:
            return None
        kept = _jpeg_segment_kept(marker, segment)
        if kept is not None:
            out += kept
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            scan = pos
            while True:  # jump from 0xFF to 0xFF (bytes.index, not a Python loop over every byte)
                pos = data.index(b"\xff", pos)
                if data[pos + 1] == 0x00 or 0xD0 <= data[pos + 1] <= 0xD7:  # stuffed byte, restart marker
                    pos += 2
                    continue
                break
            out += data[scan:pos]


def _strip_png(data: bytes) -> bytes | None:
    signature = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(signature):
        return None
    out, pos = bytearray(signature), len(signature)
    while True:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if len(kind) != 4 or end > len(data):
            return None
        if kind[0] & 0x20 == 0 or kind in _PNG_KEEP:  # critical (bit 5 of its first letter clear), or listed
            out += data[pos:end]
        pos = end
        if kind == b"IEND":
            return bytes(out)


def pixel_id(im: Image.Image) -> str:
    """SHA-256 of an RGB image's size and raw pixels: the image id."""
    rgb = _to_rgb(im)
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _existing(directory: Path, image_id: str) -> Path | None:
    for ext in (".jpg", ".png"):
        candidate = directory / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _atomic_write(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def ingest_image(
    settings: Settings,
    source: Path | str | bytes,
    *,
    name: str | None = None,
    source_label: str = "upload",
) -> ImageRecord:
    """Validate, decode and store an image (file path or bytes). Raises :class:`ImageRejected`."""
    if name is None:
        name = Path(source).name if isinstance(source, (str, Path)) else "uploaded image"
    data = _read_source(source, name, settings.max_file_bytes)
    im = _open_checked(data, name, settings)
    original_format, original_mode = im.format, im.mode
    try:
        im.load()  # the full decode: truncated or corrupt data fails here
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            im.seek(0)
        # EXIF orientation is applied so that models see the picture upright.
        rotated = _orientation(im) not in (None, 1)
        oriented = ImageOps.exif_transpose(im) if rotated else im
        rgb = _to_rgb(oriented)
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, TypeError, OverflowError, ... on corrupt data
        raise ImageRejected(name, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    image_id = pixel_id(rgb)

    # A phone's JPEG often opens as MPO (the photo plus a preview or depth picture): its first
    # picture is a plain JPEG, kept as one.
    keep = (
        (original_format in _KEEP_AS_IS or original_format == "MPO")
        and original_mode == "RGB"
        and not rotated
        and (n_frames == 1 or original_format == "MPO")
    )
    directory = settings.images_dir / image_id[:2]
    directory.mkdir(parents=True, exist_ok=True)
    existing = _existing(directory, image_id)
    if existing is not None and _file_decodes_to(existing, image_id):
        fmt = "JPEG" if existing.suffix == ".jpg" else "PNG"
        return ImageRecord(image_id, existing, rgb.width, rgb.height, source_label, fmt, created=False)
    # A stored file that no longer decodes to its picture (damaged on disk) is written again from
    # this copy; the row that names it is pointed at the new file (Store.add_image).
    width, height = rgb.width, rgb.height
    if keep:
        del rgb, oriented  # one decoded copy at a time: _decodes_to decodes the file again
        im.close()
    stripped = strip_metadata(data, original_format) if keep else None
    if stripped is not None and not _decodes_to(stripped, image_id):
        stripped = None  # the walker misread the file: re-encode it instead
    if stripped is not None:
        fmt = "PNG" if original_format == "PNG" else "JPEG"
        ext, payload = _KEEP_AS_IS[fmt], stripped
    else:
        if keep:  # the walker misread it: decode again to re-encode
            rgb = _to_rgb(_decoded(data))
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        ext, payload, fmt = ".png", buffer.getvalue(), "PNG"
    dest = directory / f"{image_id}{ext}"
    _atomic_write(dest, payload)
    replaces = existing if existing is not None and existing != dest else None
    return ImageRecord(image_id, dest, width, height, source_label, fmt, created=True, replaces=replaces)


def _decoded(data: bytes) -> Image.Image:
    """The first picture of bytes whose size was already checked, decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        im.load()
        return im


def _file_decodes_to(path: Path, image_id: str) -> bool:
    try:
        return _decodes_to(path.read_bytes(), image_id)
    except OSError:
        return False


def _decodes_to(data: bytes, image_id: str) -> bool:
    """Do these bytes decode to the picture with this id?"""
    try:
        return pixel_id(_decoded(data)) == image_id
    except Exception:  # noqa: BLE001 - any decoder error means "not the same picture"
        return False


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - malformed EXIF just means "no orientation"
        return None


def discard(record: ImageRecord) -> None:
    """Remove a file this process just wrote (``record.created``), e.g. when the database write
    that should reference it failed. Files that existed before are left alone."""
    if record.created and record.path.is_file():
        record.path.unlink()


def stored_files(settings: Settings) -> set[Path]:
    """Every stored image file under the data root (temporary files excluded)."""
    root = settings.images_dir
    if not root.is_dir():
        return set()
    return {p.resolve() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def load_image(path: str | Path) -> Image.Image:
    """Open a stored image fully decoded as RGB (the file handle is closed). A file that no longer
    decodes (replaced, truncated or removed since its import) is ``ImageRejected``, naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(str(path), f"the stored image cannot be read ({type(exc).__name__}: {exc})") from exc
