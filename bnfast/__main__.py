import sys

from bnfast.cli import main

sys.exit(main())
