"""``python -m abd_ray.cli``: the ``abd-ray`` command."""

import sys

from abd_ray.cli import main

sys.exit(main())
