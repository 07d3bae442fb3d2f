"""``python -m dispa`` is the ``dispa`` command."""

import sys

from dispa.cli import main

sys.exit(main())
