"""Preprocessing stages. Importing this package registers every stage in its step's registry (STEPS: INGEST,
REGIONS, FEATURES, PARSE); heavy libraries load lazily."""
from densevse.stages.base import FEATURES, INGEST, PARSE, REGIONS, STEPS, Reject, Stage  # noqa: F401
from densevse.stages import (ingest, gold, features, features_crops, features_boxhead, regions,  # noqa: F401,E402
                             regions_with_features, parse)
