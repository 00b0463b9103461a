import sys

from xenblockctl.cli.main import main

sys.exit(main())
