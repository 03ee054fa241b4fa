"""`python -m pipeline.cli ...` (what a Ray job runs)."""
import sys

from pipeline.cli.main import main

sys.exit(main())
