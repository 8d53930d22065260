import sys

from wasmesh.cli import main

sys.exit(main())
