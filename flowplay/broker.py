"""The embedded broker: kombu's filesystem transport, with messages published atomically.

kombu's own ``_put`` creates the message file under its final name and then writes it, so
a consumer polling every few milliseconds can pick up an empty file and crash the worker
with a ``JSONDecodeError``. Here a message is written under a name no consumer matches and
renamed into place (``os.replace`` is atomic on one filesystem), so a consumer sees either
nothing or the whole message.

Registered as the ``filesystem`` transport alias in ``flowplay/celery.py``, so the default
``CELERY_BROKER_URL=filesystem://`` uses it in every process (web, worker, beat).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add message {name!r} to {self.data_folder_out}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
