"""Reading a request's images into memory, the size and file-count limits enforced as they arrive.

`read_uploads` takes multipart/form-data (python-multipart's streaming parser, file parts
kept, form fields read past) or one raw image body, and raises `RequestError` (a status
and a message naming why) for what the server will not answer with predictions.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

RAW_NAME = "upload"  # the "file" of an image sent as the whole body


HOW_TO_SEND = "send image files as multipart/form-data, or one image as the body (image/* or application/octet-stream)"


class RequestError(Exception):
    """A request the server will not answer with predictions: `status` and a message naming why."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.extra, self.headers = status, extra, headers


class FileParts:
    """python-multipart's streaming parser, keeping each file part's bytes in memory.

    Parts without a filename (plain form fields) are read past; the file count is checked
    as each part's headers end, so the 65th file is refused before its bytes arrive."""

    def __init__(self, boundary: bytes, max_files: int):
        self.max_files = max_files
        self.files: list[tuple[str, bytearray]] = []
        self.ended = False
        self._field, self._value, self._headers = bytearray(), bytearray(), {}
        self._current: bytearray | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def uploads(self) -> list[tuple[str, bytes]]:
        if not self.ended:
            raise RequestError(400, "the multipart body ended before its closing boundary")
        return [(name, bytes(data)) for name, data in self.files]

    def _part_begin(self) -> None:
        self._headers, self._current = {}, None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in options:
            return  # a form field, not a file
        if len(self.files) == self.max_files:
            raise RequestError(413, f"too many files: at most {self.max_files} in one request")
        self._current = bytearray()
        self.files.append((options[b"filename"].decode("utf-8", "replace") or RAW_NAME, self._current))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.extend(data[start:end])

    def _end(self) -> None:
        self.ended = True


class RawBody:
    """One image sent as the whole body."""

    def __init__(self):
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data.extend(chunk)

    def uploads(self) -> list[tuple[str, bytes]]:
        return [(RAW_NAME, bytes(self.data))]


async def read_uploads(request: Request, max_bytes: int, max_files: int) -> list[tuple[str, bytes]]:
    """The request's images as (name, bytes), read into memory, never more than `max_bytes`."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        if not options.get(b"boundary"):
            raise RequestError(400, "multipart/form-data without a boundary")
        body = FileParts(options[b"boundary"], max_files)
    elif kind in (b"", b"application/octet-stream") or kind.startswith(b"image/"):
        body = RawBody()
    else:
        hint = " (curl: -F file=@photo.jpg, or -H 'Content-Type: image/jpeg' --data-binary @photo.jpg)"
        raise RequestError(415, f"unsupported content type {kind.decode('latin-1')!r}: {HOW_TO_SEND}{hint}")
    too_large = RequestError(
        413, f"upload too large: at most {max_bytes / 2**20:.3g} MB in one request (--max-upload-mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large  # said before a byte of it is read
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large  # a chunked body that never said its length: stopped as it crosses
            body.write(chunk)
    except MultipartParseError as e:
        raise RequestError(400, f"malformed multipart body ({e})") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before its upload ended") from None
    if received == 0:
        raise RequestError(400, f"empty body: {HOW_TO_SEND}")
    uploads = body.uploads()
    if not uploads:
        raise RequestError(400, f"no files in the multipart body: {HOW_TO_SEND}")
    return uploads
