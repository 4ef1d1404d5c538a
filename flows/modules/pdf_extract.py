"""`pdf-extract`: the text of a PDF given as base64, a data: URL or a curl binary download."""

from __future__ import annotations

import binascii
import io
from typing import Any
from urllib.parse import unquote_to_bytes

from .base import (
    Module,
    RunContext,
    StepError,
    _b64decode,
    _obj,
    register,
)

MAX_PDF_BYTES = 20 * 1024 * 1024
MAX_PDF_PAGES = 2000
# Decoded page content streams, summed over the pages (a stream shared by many pages counts
# once per page: it is parsed once per page). A 19 KB PDF whose pages share one 5 MB Flate
# stream would otherwise keep pypdf busy for minutes. Text-heavy pages have a few KB each.
MAX_PDF_CONTENT_BYTES = 16 * 1024 * 1024
# Per stream, any filter (pypdf's default is 75 MB).
MAX_PDF_STREAM_BYTES = 16 * 1024 * 1024


def _pdf_bytes(content: Any) -> bytes:
    if isinstance(content, dict):
        content = content.get("body")
        if not isinstance(content, str):
            raise StepError("content.body must be a base64 string", "PDF_ERROR", False)
    if content.startswith("data:"):
        header, sep, payload = content.partition(",")
        if not sep:
            raise StepError("Malformed data: URL", "PDF_ERROR", False)
        if header.lower().endswith(";base64"):
            return _b64decode(payload)
        return unquote_to_bytes(payload)
    return _b64decode(content)


@register
class PdfExtract(Module):
    app_id = "pdf-extract"
    name = "PDF extract"
    summary = "Extract the text of a PDF given as base64, a data: URL or a curl binary download."
    cpu_bound = True
    args_schema = _obj(
        {
            "content": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "object", "properties": {"body": {"type": "string"}}, "required": ["body"]},
                ],
                "description": "must be base64 PDF text, a data: URL, or a curl out with a base64 body",
            }
        },
        ["content"],
    )
    out_schema = _obj({"text": {"type": "string"}, "pages": {"type": "integer", "minimum": 0}}, ["text", "pages"])

    def execute(self, args: dict, ctx: RunContext) -> Any:
        from pypdf import apply_configuration

        limit = MAX_PDF_STREAM_BYTES
        with apply_configuration(
            zlib_maximum_output_length=limit,
            lzw_maximum_output_length=limit,
            run_length_maximum_output_length=limit,
            brotli_maximum_output_length=limit,
            maximum_declared_stream_length=limit,
        ):
            return self._extract(args)

    def _extract(self, args: dict) -> Any:
        from pypdf import PdfReader

        try:
            data = _pdf_bytes(args["content"])
        except (ValueError, binascii.Error) as exc:
            raise StepError(f"content is not valid base64: {exc}", "PDF_ERROR", False) from exc
        if len(data) > MAX_PDF_BYTES:
            raise StepError(f"PDF is larger than {MAX_PDF_BYTES} bytes", "PDF_ERROR", False)
        # The spec lets the header sit anywhere in the first 1024 bytes.
        if b"%PDF-" not in data[:1024]:
            hint = " (for a curl download, set responseType to binary)" if isinstance(args["content"], dict) else ""
            raise StepError(f"content is not a PDF{hint}", "PDF_ERROR", False)
        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise StepError("PDF is password-protected", "PDF_ERROR", False)
            pages = reader.pages
            if len(pages) > MAX_PDF_PAGES:
                raise StepError(f"PDF has more than {MAX_PDF_PAGES} pages", "PDF_ERROR", False)
            content = 0
            for page in pages:  # all pages before any text: a stream is decoded once, parsing is slow
                contents = page.get_contents()
                content += len(contents.get_data()) if contents is not None else 0
                if content > MAX_PDF_CONTENT_BYTES:
                    raise StepError(
                        f"The PDF's page contents expand to more than {MAX_PDF_CONTENT_BYTES:,} bytes "
                        "(a decompression bomb?)",
                        "PDF_ERROR",
                        False,
                    )
            texts = [page.extract_text() or "" for page in pages]
        except StepError:
            raise
        except Exception as exc:  # pypdf raises many types on malformed files
            raise StepError(f"Cannot read PDF: {exc}", "PDF_ERROR", False) from exc
        return {"text": "\n".join(texts), "pages": len(texts)}
