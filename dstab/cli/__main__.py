"""``python -m dstab.cli``: the ``dstab`` command."""

import sys

from . import main

sys.exit(main())
