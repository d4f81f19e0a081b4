"""``python -m hessop``: the ``hessop`` command line."""

import sys

from hessop.cli import main

sys.exit(main())
