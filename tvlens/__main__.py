"""``python -m tvlens ...`` runs the ``tvlens`` command (see :mod:`tvlens.cli`)."""

import sys

from .cli import main

sys.exit(main())
