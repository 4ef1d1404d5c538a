"""Re-encrypt every credential and KV value under the first key of FLOWPLAY_SECRET_KEYS.

Rotation: generate a key (``--generate``), put it first in ``FLOWPLAY_SECRET_KEYS`` keeping
the old ones after it, restart the processes, run this command, then drop the old keys.
Idempotent; safe while plays run (each row is rewritten under its own row lock).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from flows import vault
from flows.models import KV, Credential

BATCH = 200


class Command(BaseCommand):
    help = "Re-encrypt credentials and KV values under the first key of FLOWPLAY_SECRET_KEYS."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--generate", action="store_true", help="print a new key and change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["generate"]:
            self.stdout.write(vault.generate_key())
            return
        try:
            keys = vault.key_list()
            vault.fernet()
        except vault.SecretKeyError as exc:
            raise CommandError(str(exc)) from None
        try:
            credentials = self._credentials()
            kv = self._kv()
        except vault.SecretKeyError as exc:
            raise CommandError(
                f"{exc}; keep the old keys in FLOWPLAY_SECRET_KEYS until this command succeeds"
            ) from None
        self.stdout.write(
            f"Re-encrypted {credentials} credential(s) and {kv} KV value(s) under the first of {len(keys)} key(s)."
        )

    def _credentials(self) -> int:
        n = 0
        for pk in list(Credential.objects.values_list("pk", flat=True)):
            with transaction.atomic():
                credential = Credential.objects.select_for_update().filter(pk=pk).first()
                if credential is None:
                    continue
                changes = {"secret": vault.rotate(credential.secret)}
                if credential.access_token:
                    changes["access_token"] = vault.rotate(credential.access_token)
                Credential.objects.filter(pk=pk).update(**changes)
                n += 1
        return n

    def _kv(self) -> int:
        n = 0
        last = 0
        while True:
            pks = list(KV.objects.filter(pk__gt=last).order_by("pk").values_list("pk", flat=True)[:BATCH])
            if not pks:
                return n
            last = pks[-1]
            with transaction.atomic():
                for entry in KV.objects.select_for_update().filter(pk__in=pks).only("pk", "value"):
                    stored = entry.value
                    sealed = (
                        {vault.ENCRYPTED: vault.rotate(stored[vault.ENCRYPTED])}
                        if vault.is_sealed(stored)
                        else vault.seal(stored)
                    )
                    KV.objects.filter(pk=entry.pk).update(value=sealed)
                    n += 1
