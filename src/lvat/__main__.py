import sys

from lvat.cli import main

sys.exit(main())
