"""``python -m fastkd`` is the ``fastkd`` command."""

import sys

from fastkd.cli import main

sys.exit(main())
