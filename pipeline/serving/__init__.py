"""Serving: the registered MLflow models (pyfunc.py) and describing new images (describe.py).

MLflow puts a registered model's shipped copy of the code first on sys.path when it loads the model. In a
process that already runs this project's `pipeline` (the CLI, a server), `models` must then come from the same
tree, not from that copy (an older layout's `models` would not import here): it is imported from this tree
first."""
import importlib
import sys
from pathlib import Path

if "models" not in sys.modules:
    _root = str(Path(__file__).resolve().parents[2])
    sys.path.insert(0, _root)
    try:
        importlib.import_module("models")
    finally:
        sys.path.remove(_root)
