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
            texts = [page.extract_text() or "" for page in pages]
        except StepError:
            raise
        except Exception as exc:  # pypdf raises many types on malformed files
            raise StepError(f"Cannot read PDF: {exc}", "PDF_ERROR", False) from exc
        return {"text": "\n".join(texts), "pages": len(texts)}
