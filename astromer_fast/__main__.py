import sys

from astromer_fast.cli import main

sys.exit(main())
