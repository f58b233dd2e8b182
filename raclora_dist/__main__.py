"""``python -m raclora_dist`` is ``raclora``."""

import sys

from raclora_dist.cli import main

sys.exit(main())
