"""``python -m fl`` is the ``fl`` command."""

import sys

from fl.cli.main import main

sys.exit(main())
