"""``python -m pviommu``: the ``pviommu`` command."""

import sys

from .cli import main

sys.exit(main())
