"""The ``web`` process: Daphne, with request bodies over the limit refused while they arrive.

``python -m flowplay.web <daphne's arguments>`` is ``daphne <daphne's arguments>`` plus
``flowplay.bodylimit.install_daphne_guard()`` (see there why Daphne needs it).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")
    import django

    django.setup()
    from daphne.cli import CommandLineInterface

    from flowplay.bodylimit import install_daphne_guard

    install_daphne_guard()
    sys.argv[0] = "daphne"
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
