"""``python -m kvpoll`` runs the ``kvpoll`` command."""

import sys

from kvpoll.cli import main

sys.exit(main())
