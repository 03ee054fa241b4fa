"""Preprocessing stages. Importing this package registers every stage in STAGES (heavy libraries load lazily)."""
from densevse.stages.base import STAGES, Reject, Stage  # noqa: F401
from densevse.stages import ingest, gold, features, regions, features_extra, regions_features, parse  # noqa: F401,E402
