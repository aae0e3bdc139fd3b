"""``python -m nsfw_guard``: the same as the ``nsfw-guard`` command."""

import sys

from .cli import main

sys.exit(main())
