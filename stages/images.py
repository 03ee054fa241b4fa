"""Image decoding shared by the stages: every failure is a Reject with a reason a person can act on.

Hostile files are refused before they cost memory: the byte size is checked before reading (MAX_IMAGE_BYTES),
the pixel count from the header before decoding (MAX_IMAGE_PIXELS), and a big JPEG is decoded by libjpeg's DCT
scaling (draft mode) straight to near the size it is downscaled to.

EXIF orientation is applied only on request (`exif_transpose=True`): where boxes come with the image (COCO,
Flickr30k Entities, the synthetic set) they are in the stored pixels, as annotated, so those pixels are kept;
without gold boxes (ingest, `densevse describe`) the image is turned the way a viewer shows it.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from densevse.stages.base import Reject, is_transient
from densevse.stages.fetch import DownloadParams, download_url, img2dataset_failure, read_object, read_tar_member, source_kind

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is rejected, not silently grey-filled
# 32 MiB: far above a dataset photo (COCO's largest is ~1 MB), far below what hurts a worker's memory.
MAX_IMAGE_BYTES = 32 * 2**20
# 64M pixels (8000x8000): decoded RGB is 192 MB; PIL's own guard only raises at 2x its limit, so decode_rgb
# checks the header itself and refuses anything above this. PIL's guard stays on (same value) as a backstop
# for every other Image.open in the process.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def read_bytes(path: str, max_bytes: int = MAX_IMAGE_BYTES, download: DownloadParams | None = None) -> bytes:
    """The bytes of a sample's source: a local file, or one of stages/fetch.py's source URIs (an http(s) URL,
    downloaded with `download`; an s3:// or gs:// object; a member of an img2dataset tar; img2dataset's record
    of a failed download).
    A missing, empty, unreadable or over-`max_bytes` image is a Reject (an input problem); a transient I/O
    error (EIO, a dropped network mount ...: stages.base.is_transient) or a failing object store (the endpoint
    down, throttling, credentials: stages.base.SourceUnavailable) is raised on."""
    kind = source_kind(path)
    if kind == "url":
        return download_url(path, max_bytes, download)
    if kind == "tar":
        return read_tar_member(path, max_bytes)
    if kind == "img2dataset_failed":
        raise img2dataset_failure(path)
    if kind == "object":
        return read_object(path, max_bytes)
    p = Path(path)
    if not p.is_file():
        raise Reject(f"missing image file {path}")
    try:
        size = p.stat().st_size
        if size <= max_bytes:
            with p.open("rb") as f:
                data = f.read(max_bytes + 1)  # bounded: the file may grow after stat
            size = len(data)
    except OSError as e:
        if is_transient(e):
            raise
        raise Reject(f"unreadable image file {path} ({e.strerror or e})") from None
    if size > max_bytes:
        raise Reject(f"image file {path} is {size} bytes, over the cap of {max_bytes} bytes")
    if not data:
        raise Reject(f"empty image file {path}")
    return data


def decode_rgb(data: bytes, max_side: int | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_IMAGE_BYTES, exif_transpose: bool = False) -> tuple[Image.Image, float]:
    """Decode to RGB (grayscale, CMYK, palette, alpha handled), downscaled so the longer side <= max_side.

    Returns the image and the scale factor applied relative to the original size (1.0 when not downscaled), so
    boxes can follow. `exif_transpose` turns the image by its EXIF orientation first (see the module docstring).
    """
    if len(data) > max_bytes:
        raise Reject(f"image is {len(data)} bytes, over the cap of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit: refused below, with a reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise Reject(f"image too large: {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
        scale, target = 1.0, None
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            if img.format == "JPEG":
                img.draft("RGB", target)  # libjpeg scales by 1/2, 1/4, 1/8, never below target
        img.load()
        if exif_transpose:
            if target and img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_SIDES:
                target = target[::-1]
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise Reject("not a decodable image") from None
    except Image.DecompressionBombError as e:
        raise Reject(f"image too large: over the limit of {max_pixels} pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if is_transient(e):
            raise
        raise Reject(f"corrupt image ({e})") from None
    if w < 1 or h < 1:
        raise Reject(f"zero-size image {w}x{h}")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        img = bg
    elif img.mode != "RGB":
        img = img.convert("RGB")  # L, I;16, CMYK, P, YCbCr ...
    if target and img.size != target:
        img = img.resize(target, Image.Resampling.BILINEAR)
    return img, scale


def is_plain_jpeg(data: bytes) -> bool:
    """True for a JPEG that decodes as stored to 3-channel RGB, with no EXIF turn: its bytes can stand for the
    normalised image as they are (ingest keeps them when not downscaled, instead of paying a re-encode and a
    generation of JPEG loss). Call after decode_rgb accepted the bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return im.format == "JPEG" and im.mode == "RGB" and im.getexif().get(ExifTags.Base.Orientation, 1) == 1


def to_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_array(data: bytes) -> np.ndarray:
    """HxWx3 uint8 of an already-normalised JPEG (the `image` column after ingest)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
