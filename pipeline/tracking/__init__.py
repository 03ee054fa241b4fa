"""MLflow, one module per concern; callers import the module they need:

    server     the tracking server (`densevse mlflow`, tests): start, wait, stop; tracking URIs made absolute
    runs       a training job's run: params and config, per-epoch metrics, bounded calls, backfill, end status
    registry   the trained model logged as an mlflow.pyfunc model, registered, promoted to `champion`
    figures    curves and the best-phrase-per-region figure, for the MLflow run and report.html alike
"""
