"""Import shim: MLflow models registered before the layout change pickle `pipeline.captioner.CaptionerPyfunc`.
The code is in pipeline/serving/pyfunc.py and models/captioner.py (tests/test_registry_compat.py loads one)."""
from pipeline.serving.pyfunc import CaptionerPyfunc, pyfunc_signature  # noqa: F401  (first: see pipeline/serving)
from models.captioner import Captioner  # noqa: F401,E402
