"""``python -m splitmesh``."""

import sys

from splitmesh.cli import main

sys.exit(main())
