"""``python -m dispa.server`` is ``dispa-server``."""

import sys

from dispa.cli import server_main

sys.exit(server_main())
