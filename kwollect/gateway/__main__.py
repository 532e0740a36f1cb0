"""python -m kwollect.gateway: the same as the kwollect-api command."""

import sys

from kwollect.gateway import main

sys.exit(main())
