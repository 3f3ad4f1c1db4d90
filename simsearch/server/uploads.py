"""Images in request bodies: multipart file parts or one raw image, with size, count and type limits.

The server reads images only from the request itself; it never opens a path a client names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..errors import RequestRefused
from ..images import Image, decode

RAW_TYPES = ("application/octet-stream",)  # besides image/*
MAGIC_SUFFIXES = [(b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
                  (b"MM\x00*", ".tif"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif")]


@dataclass(frozen=True)
class Upload:
    name: str  # the file name the client gave (echoed back, never opened)
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def decode(self, max_pixels: int) -> Image:
        return Image(rgb=decode(self.data, self.name, max_pixels=max_pixels), sha256=self.sha256, source=self.name)

    def suffix(self) -> str:
        """A file suffix from the content, not from the client's name."""
        if self.data[:4] == b"RIFF" and self.data[8:12] == b"WEBP":
            return ".webp"
        for magic, suffix in MAGIC_SUFFIXES:
            if self.data.startswith(magic):
                return suffix
        return ".img"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _image_type(media: str) -> bool:
    return media.startswith("image/") or media in RAW_TYPES


def _client_name(name: str | None, fallback: str) -> str:
    name = "".join(c for c in (name or "") if c.isprintable())[:255]
    return name or fallback


def _parts(body: bytes, content_type: str) -> int:
    """How many parts a multipart body holds, from its boundary delimiters (the last one closes it)."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")[1:]
                     if p.strip().lower().startswith("boundary=")), "")
    return max(body.count(b"--" + boundary.encode("latin-1")) - 1, 0) if boundary else 0


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """The images of a request: every file part of a multipart form, or the whole body as one image."""
    media = media_type(request.headers.get("content-type"))
    uploads: list[Upload] = []
    if media == "multipart/form-data":
        # Counted before parsing: the parser's own limit answers 400, and too many images is a 413 (the body
        # is bounded by BodyLimitMiddleware, so reading it first costs at most --max-upload-mb).
        parts = _parts(await request.body(), request.headers.get("content-type", ""))
        if parts > max_images:
            raise RequestRefused(413, f"{parts} parts in one request; the limit is {max_images} images")
        form = await request.form(max_files=max_images, max_fields=max_images)
        try:
            for field_name, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    raise RequestRefused(400, f"form field {field_name!r} is not a file; send images as file parts")
                part_type = media_type(value.content_type)
                if part_type and not _image_type(part_type):
                    raise RequestRefused(415, f"{value.filename or field_name}: content type {part_type!r} is not "
                                              "an image (image/* or application/octet-stream)")
                uploads.append(Upload(_client_name(value.filename, f"upload-{len(uploads) + 1}"), await value.read()))
        finally:
            await form.close()
    elif _image_type(media):
        uploads.append(Upload("upload", await request.body()))
    else:
        raise RequestRefused(415, f"content type {media or 'none'!r} is not accepted: send multipart/form-data "
                                  "with image files, or one image as image/* or application/octet-stream")
    if not uploads:
        raise RequestRefused(400, "the request holds no image")
    if len(uploads) > max_images:
        raise RequestRefused(413, f"{len(uploads)} images in one request; the limit is {max_images}")
    return uploads
