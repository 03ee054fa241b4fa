"""`python -m densevse.pipeline.cli ...` (what a Ray job runs)."""
import sys

from densevse.pipeline.cli.main import main

sys.exit(main())
