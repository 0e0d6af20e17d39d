"""The in-memory path for a one-file multipart body must read exactly what Starlette's parser reads."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.uploads import one_file_part, parse_form

BOUNDARY = "b0undary"
JPEG_LIKE = (
    b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\r\n--b0und\r\n\r\n" + b"\xff\xd9"
)  # CR/LF and a near-boundary


def body_of(*parts: tuple[bytes, bytes]) -> bytes:
    out = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return out + b"--" + BOUNDARY.encode() + b"--\r\n"


FILE = b'Content-Disposition: form-data; name="file"; filename="can.jpg"\r\nContent-Type: image/jpeg'
BODIES = {
    "one file": body_of((FILE, JPEG_LIKE)),
    "no part content type": body_of((b'Content-Disposition: form-data; name="file"; filename="a.png"', b"\x89PNG")),
    "text/plain part": body_of(
        (b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain', b"hi")
    ),
    "utf-8 filename": body_of(
        ('Content-Disposition: form-data; name="file"; filename="bo\u00eete.jpg"'.encode(), b"x")
    ),
    "latin-1 filename": body_of((b'Content-Disposition: form-data; name="file"; filename="bo\xeete.jpg"', b"x")),
    "header case": body_of(
        (b'content-disposition: form-data; name="file"; filename="c.jpg"\r\ncontent-type: IMAGE/JPEG', b"y")
    ),
    "empty file": body_of((FILE, b"")),
    "two files": body_of((FILE, b"a"), (FILE, b"b")),
    "other name": body_of((b'Content-Disposition: form-data; name="photo"; filename="a.jpg"', b"a")),
    "text field": body_of((b'Content-Disposition: form-data; name="file"', b"not a file")),
    "no closing boundary": body_of((FILE, b"abc"))[: -len(BOUNDARY) - 6],
    "garbage": b"this is not multipart at all",
}


def starlette_fields(body: bytes) -> list[tuple[str, str | UploadFile]]:
    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    request = Request({"type": "http", "method": "POST", "headers": headers})
    return asyncio.run(parse_form(request, body, max_files=1))


async def read_all(upload: UploadFile) -> bytes:
    return await upload.read()


@pytest.mark.parametrize("name", list(BODIES))
def test_one_file_part_reads_what_starlette_reads(name: str):
    body = BODIES[name]
    fast = one_file_part(f"multipart/form-data; boundary={BOUNDARY}", body)
    if fast is None:  # not the one-file case: the route falls back to Starlette's parser and its errors
        assert name in ("two files", "other name", "text field", "no closing boundary", "garbage", "latin-1 filename")
        return
    fields = starlette_fields(body)
    assert len(fields) == 1 and fields[0][0] == "file" and isinstance(fields[0][1], UploadFile)
    upload = fields[0][1]
    assert fast == (upload.filename, upload.content_type, asyncio.run(read_all(upload)))


def test_the_usual_upload_takes_the_in_memory_path():
    assert one_file_part(f"multipart/form-data; boundary={BOUNDARY}", BODIES["one file"]) == (
        "can.jpg",
        "image/jpeg",
        JPEG_LIKE,
    )
    assert one_file_part("multipart/form-data", BODIES["one file"]) is None  # no boundary: Starlette's 422
