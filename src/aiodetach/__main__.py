import sys

from aiodetach._cli import main

sys.exit(main())
