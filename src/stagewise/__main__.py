"""``python -m stagewise``: the ``stagewise`` command."""

import sys

from stagewise.cli import main

sys.exit(main())
