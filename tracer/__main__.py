import sys

from tracer.cli.main import main

sys.exit(main())
