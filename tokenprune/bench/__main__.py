import sys

from tokenprune.bench.cli import main

sys.exit(main())
