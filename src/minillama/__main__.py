import sys

from minillama.cli import main

sys.exit(main())
