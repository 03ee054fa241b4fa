"""Ingest: read the image and captions of each planned sample, normalise them, reject what is unusable.

The image becomes an RGB JPEG no larger than `max_side` (gold boxes are scaled with it): an RGB JPEG already
within it, with no EXIF turn, keeps its original bytes; anything else is re-encoded. Each caption is
cleaned by `check_caption`, a pure function; rejected captions are kept in `caption_rejects` with a reason,
and a sample with no usable caption, or no readable image, is rejected as a whole.

A row that already holds image bytes (serving a new image, pipeline/serving/embedder.py) is decoded from
those instead of reading `source`; `source` may be a local path, an http(s) URL (downloaded: timeout,
retries, byte cap, content type, user agent; a failure is "ingest: download failed: <why>") or an img2dataset
tar member (stages/fetch.py). Images over `max_image_bytes` or `max_pixels` are rejected before
decoding (stages/images.py). EXIF orientation is applied only to samples without gold boxes (`gold` has no
"boxes" key): a dataset's boxes are in the stored pixels as annotated (COCO, Flickr30k Entities), so turning
those pixels would misplace every box.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from densevse.stages.base import INGEST, Reject, Stage, guarded
from densevse.stages.fetch import DownloadParams, source_kind
from densevse.stages.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_rgb, is_plain_jpeg, read_bytes, to_jpeg
from densevse.stages.text import clean_caption

def check_caption(text, max_words: int) -> tuple[str, str | None]:
    """(cleaned text, None) for a usable caption, else (text, reason): stages/text.py's checks + a word limit."""
    clean, reason = clean_caption(text)
    if reason:
        return clean, reason
    n = len(clean.split())
    if n > max_words:
        return clean, f"caption has {n} words, over the limit of {max_words}"
    return clean, None


class IngestParams(DownloadParams):
    """Image and caption limits, and (inherited) how http(s) sources are downloaded: timeout_s, retries,
    backoff_s, max_redirects, user_agent, threads (stages/fetch.py)."""
    max_side: int = Field(640, ge=32)  # longer image side after ingest; larger images are downscaled
    max_caption_words: int = Field(60, ge=1)
    jpeg_quality: int = Field(92, ge=50, le=100)  # for re-encoded images (an RGB JPEG within max_side is kept)
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1)  # bigger image files are rejected unread
    # Header width x height above this is rejected undecoded; only lowered: PIL's process-wide guard is the same
    max_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=MAX_IMAGE_PIXELS)


@INGEST.register("image_caption")
class Ingest(Stage):
    name = "ingest"
    Params = IngestParams

    def process(self, rows: list[dict]) -> list[dict]:
        """Row by row, with the batch's http(s) sources downloaded first, `threads` at a time (a download
        waits on the network, not the CPU); each download's failure is raised in its own row's process_row."""
        urls = [r["source"] for r in rows if not r["reject"] and not r["image"] and source_kind(r["source"]) == "url"]
        fetched: dict[str, bytes | Exception] = {}
        if urls:
            def get(url):
                try:
                    return read_bytes(url, self.params.max_image_bytes, self.params)
                except Exception as e:  # noqa: BLE001 - raised again in the row's process_row (guarded)
                    return e
            with ThreadPoolExecutor(min(self.params.threads, len(urls))) as pool:
                fetched = dict(zip(urls, pool.map(get, urls)))
        for row in rows:
            if not row["reject"]:
                guarded(self.name, row, lambda r: self.process_row(r, fetched.get(r["source"])))
        return rows

    def process_row(self, row: dict, fetched: bytes | Exception | None = None) -> None:
        accepted, rejects = [], json.loads(row["caption_rejects"])
        for i, raw in enumerate(json.loads(row["captions"])):
            text, reason = check_caption(raw, self.params.max_caption_words)
            if reason:
                rejects.append({"index": i, "text": text, "reason": reason})
            else:
                accepted.append({"index": i, "text": text})
        row["captions"], row["caption_rejects"] = json.dumps(accepted), json.dumps(rejects)
        p, gold = self.params, json.loads(row["gold"])
        if isinstance(fetched, Exception):
            raise fetched
        data = row["image"] or fetched or read_bytes(row["source"], p.max_image_bytes, p)  # serving gives bytes
        img, scale = decode_rgb(data, p.max_side, max_pixels=p.max_pixels,
                                max_bytes=p.max_image_bytes, exif_transpose="boxes" not in gold)
        row["image"] = data if scale == 1.0 and is_plain_jpeg(data) else to_jpeg(img, p.jpeg_quality)
        row["width"], row["height"] = img.width, img.height
        if scale != 1.0 and gold.get("boxes"):
            gold["boxes"] = [[round(v * scale, 2) for v in b] for b in gold["boxes"]]
            row["gold"] = json.dumps(gold)
        if not accepted:
            raise Reject("no usable caption" + (f" ({rejects[0]['reason']})" if rejects else ""))
