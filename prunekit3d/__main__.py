import sys

from prunekit3d.cli import main

sys.exit(main())
