"""`send-mail`: an email through Django's email backend.

The backend comes from settings (``EMAIL_BACKEND``: SMTP when ``EMAIL_HOST`` is set, the
file backend under ``var/mail`` in the embedded default, locmem in tests). Attachments
come from earlier outputs: base64 text (a curl binary download, a base64-encode result),
a curl out itself, or plain text.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable
from email.utils import formataddr, getaddresses
from typing import Any

from .base import Module, RunContext, StepError, _b64decode, _invalid, _obj, register

MAX_RECIPIENTS = 100
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_ADDRESSES = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_RECIPIENTS},
    ],
    "description": "an address or a list of addresses",
}


def _addresses(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [item.strip() for item in value if isinstance(item, str) and item.strip()]
    # "Doe, Jane <jane@x.test>, bob@x.test" is two addresses: split as a mail header would.
    return [formataddr(pair) if pair[0] else pair[1] for pair in getaddresses([str(value)]) if pair[1]]


def _bad_address(address: str) -> bool:
    # "Name <a@b>" is fine; the address part must look like one, with no header injection.
    if "\r" in address or "\n" in address:
        return True
    inner = address[address.rfind("<") + 1 : -1] if address.endswith(">") and "<" in address else address
    return not _ADDRESS.match(inner.strip())


@register
class SendMail(Module):
    app_id = "send-mail"
    summary = "Send an email (text and/or HTML body, attachments from earlier outputs) through Django's email backend."
    args_schema = _obj(
        {
            "to": _ADDRESSES,
            "cc": _ADDRESSES,
            "bcc": _ADDRESSES,
            "from": {"type": "string", "minLength": 1, "description": "default: DEFAULT_FROM_EMAIL"},
            "replyTo": {"type": "string", "minLength": 1},
            "subject": {"type": "string", "maxLength": 998},
            "body": {
                "anyOf": [
                    {"type": "string"},
                    _obj({"text": {"type": "string"}, "html": {"type": "string"}}),
                ],
                "description": "text, or {text, html}",
            },
            "attachments": {
                "type": "array",
                "maxItems": 20,
                "items": _obj(
                    {
                        "filename": {"type": "string", "minLength": 1, "maxLength": 255},
                        "content": {"description": "base64 text, a curl out with a base64 body, or text"},
                        "contentType": {"type": "string", "default": "application/octet-stream"},
                        "encoding": {"type": "string", "enum": ["base64", "text"], "default": "base64"},
                    },
                    ["filename", "content"],
                ),
            },
        },
        ["to", "subject", "body"],
    )
    out_schema = _obj({"messageId": {"type": "string"}, "recipients": {"type": "integer"}}, ["messageId", "recipients"])

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        for name in ("to", "cc", "bcc", "from", "replyTo"):
            value = args.get(name)
            if value is None or (lenient and isinstance(value, str) and "{{" in value):
                continue
            if isinstance(value, str) and ("\r" in value or "\n" in value):
                yield name, "must not contain line breaks"
                continue
            for address in _addresses(value):
                if not (lenient and "{{" in address) and _bad_address(address):
                    yield name, f"{address!r} is not an email address"
                    break
        subject = args.get("subject")
        if isinstance(subject, str) and ("\r" in subject or "\n" in subject):
            yield "subject", "must not contain line breaks"
        if not lenient and "to" in args and not _addresses(args["to"]):
            yield "to", "must name at least one address"

    @staticmethod
    def _attachment(item: dict, index: int) -> tuple[str, bytes, str]:
        content = item["content"]
        if isinstance(content, dict):  # a curl out
            content = content.get("body")
        if not isinstance(content, str):
            raise _invalid(f"attachments[{index}].content must be text or base64 text")
        if item.get("encoding", "base64") == "text":
            data = content.encode("utf-8")
        else:
            if content.startswith("data:") and "," in content:
                content = content.split(",", 1)[1]
            try:
                data = _b64decode(content)
            except (ValueError, binascii.Error) as exc:
                raise _invalid(f"attachments[{index}].content is not valid base64: {exc}") from exc
        if len(data) > MAX_ATTACHMENT_BYTES:
            raise _invalid(f"attachments[{index}] is larger than {MAX_ATTACHMENT_BYTES} bytes")
        return item["filename"], data, item.get("contentType", "application/octet-stream")

    def execute(self, args: dict, ctx: RunContext) -> Any:
        from django.conf import settings
        from django.core.mail import EmailMultiAlternatives, get_connection
        from django.core.mail.message import make_msgid

        body = args["body"]
        text, html = (body, None) if isinstance(body, str) else (body.get("text"), body.get("html"))
        if text is None and html is not None:
            text = re.sub(r"<[^>]+>", "", html)  # a plain part for clients that show no HTML
        to, cc, bcc = _addresses(args["to"]), _addresses(args.get("cc")), _addresses(args.get("bcc"))
        message_id = make_msgid(domain=getattr(settings, "EMAIL_MESSAGE_ID_DOMAIN", None) or "flowplay")
        message = EmailMultiAlternatives(
            subject=args["subject"],
            body=text or "",
            from_email=args.get("from") or settings.DEFAULT_FROM_EMAIL,
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=[args["replyTo"]] if args.get("replyTo") else None,
            headers={"Message-ID": message_id},
        )
        if html is not None:
            message.attach_alternative(html, "text/html")
        for index, item in enumerate(args.get("attachments", [])):
            message.attach(*self._attachment(item, index))
        try:
            connection = get_connection(fail_silently=False, timeout=min(30.0, max(1.0, ctx.timeout)))
            sent = connection.send_messages([message])
        except Exception as exc:  # noqa: BLE001 - smtplib/socket errors, whatever the backend raises
            raise StepError(f"Sending mail failed: {exc}", "MAIL_ERROR") from exc
        if not sent:
            raise StepError("The email backend sent nothing", "MAIL_ERROR")
        return {"messageId": message_id, "recipients": len(to) + len(cc) + len(bcc)}
