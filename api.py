"""The HTTP API's shapes: answers, client errors, and bounded parsing of request bodies.

Every answer is JSON: ``{"code": 0, "msg": "ok", ...}`` or, with an HTTP 4xx status,
``{"code": -1, "msg": "<what is wrong>"}`` (LiveTalking's shape). Every body is read
within ``--request_timeout`` seconds and the app's size limit, and every parsing
failure (charset, JSON syntax, depth, number size, multipart structure, part
encodings) is a 400 with a message; nothing a client sends can cause a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import SplitResult, urlsplit

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 4096  # a multipart text field (sessionid, interrupt, token)
MAX_PARTS = 16  # parts in one multipart body
MAX_URL_CHARS = 2048  # a URL a client gives (/push, /janus): the length browsers and CDNs commonly keep to


class HTTPError(Exception):
    """A client error answered as ``{"code": -1, "msg": msg}`` with ``status`` (4xx)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def ok(data: Any = None, **extra: Any) -> web.Response:
    """The success answer ``{"code": 0, "msg": "ok", **extra}`` (plus ``data``)."""
    body: dict[str, Any] = {"code": 0, "msg": "ok", **extra}
    if data is not None:
        body["data"] = data
    return web.json_response(body)


def error_response(status: int, msg: str) -> web.Response:
    return web.json_response({"code": -1, "msg": msg}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Answer every error in the API's JSON shape.

    ``HTTPError`` and aiohttp's own HTTP errors (413 for a body over the limit, 404,
    405, ...) keep their status; anything else is a bug of ours: logged with its
    traceback and answered 500, still in JSON.
    """
    try:
        return await handler(request)
    except HTTPError as e:
        return error_response(e.status, e.msg)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal error (logged on the server)")


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body, within ``timeout`` s and the app's ``client_max_size``.

    Raises HTTPError(408) for a client that sends too slowly; aiohttp raises 413
    beyond the size limit.
    """
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError as e:
        raise HTTPError(408, f"request body not received within {timeout:g} s") from e


async def read_json(request: web.Request, timeout: float = 10.0) -> dict[str, Any]:
    """The request's JSON object body. Raises HTTPError(400/408/415) when it is not one."""
    raw = await read_body(request, timeout)
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(charset)
    except LookupError as e:
        raise HTTPError(400, f"unknown charset {charset[:40]!r} in Content-Type") from e
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"body is not valid {charset[:40]}: {e.reason}") from e
    try:
        body = json.loads(text)
    except RecursionError as e:
        raise HTTPError(400, "malformed JSON: nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise HTTPError(400, f"malformed JSON: {str(e)[:120]}") from e
    if not isinstance(body, dict):
        raise HTTPError(400, "JSON body must be an object")
    return body


async def read_multipart(request: web.Request, files: dict[str, int], timeout: float) -> dict[str, Any]:
    """Read a multipart/form-data body: ``files`` maps file field names to their size
    limit (bytes, kept as bytes); every other field is text of at most
    MAX_FIELD_BYTES. At most MAX_PARTS parts; no nested parts, no content or transfer
    encodings (a compressed part could expand without bound).

    Raises HTTPError 400 (not multipart, malformed, nested, encoded, unknown charset,
    too many parts), 408 (too slow) or 413 (a field over its limit).
    """
    if not request.content_type.startswith("multipart/"):
        raise HTTPError(400, "expected multipart/form-data")
    fields: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            reader = await request.multipart()
            n = 0
            async for part in reader:
                n += 1
                if n > MAX_PARTS:
                    raise HTTPError(400, f"more than {MAX_PARTS} parts")
                if not isinstance(part, BodyPartReader):
                    raise HTTPError(400, "nested multipart parts are not accepted")
                encoding = part.headers.get("Content-Encoding", "identity").lower()
                transfer = part.headers.get("Content-Transfer-Encoding", "binary").lower()
                if encoding != "identity" or transfer not in ("binary", "7bit", "8bit"):
                    raise HTTPError(400, f"part encodings are not supported ({encoding[:20]}, {transfer[:20]})")
                name = part.name or ""
                limit = files.get(name, MAX_FIELD_BYTES)
                data = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    data.extend(chunk)
                    if len(data) > limit:
                        raise HTTPError(413, f"field '{name[:40]}' exceeds {limit} bytes")
                if name in files:
                    fields[name] = bytes(data)
                else:
                    charset = part.get_charset(default="utf-8")
                    fields[name[:MAX_FIELD_BYTES]] = bytes(data).decode(charset)
    except TimeoutError as e:
        raise HTTPError(408, f"request body not received within {timeout:g} s") from e
    except HTTPError:
        raise
    except LookupError as e:
        raise HTTPError(400, f"unknown charset in a part: {str(e)[:80]}") from e
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as e:  # incl. UnicodeDecodeError, bad part headers
        raise HTTPError(400, f"malformed multipart body: {str(e)[:120] or type(e).__name__}") from e
    return fields


class BadURL(HTTPError, ValueError):
    """A URL a client gave that cannot be used: a 400 for a handler (an ``HTTPError``),
    a ``ValueError`` for a pure checker such as ``rtmp.check_rtmp_url``."""

    def __init__(self, msg: str) -> None:
        super().__init__(400, msg)


def check_url(url: Any, schemes: tuple[str, ...], expected: str) -> SplitResult:
    """``url`` split (``urllib.parse.urlsplit``) when it is a string of at most
    MAX_URL_CHARS with one of ``schemes``, a host and, if any, a port in 0..65535.

    ``expected`` names what ``url`` should be, in the messages ("'url' must be
    <expected>..."); they never repeat the URL (it may carry a key).

    Raises:
        BadURL: (a 400 and a ValueError) with what is wrong.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise BadURL(f"'url' must be {expected} of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not 0..65535)
    except ValueError as e:  # e.g. "http://[", "http://h:99999/"
        raise BadURL(f"'url' must be {expected}: {str(e)[:80]}") from None
    if parts.scheme not in schemes:
        raise BadURL(f"'url' must be {expected}, got a URL with scheme {parts.scheme[:20]!r}")
    if not parts.hostname:
        raise BadURL(f"'url' must be {expected}, got a URL without a host")
    return parts
