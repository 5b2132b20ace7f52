"""`python -m lmcache_rs server ...`."""

import sys

from lmcache_rs.cli import main

sys.exit(main())
