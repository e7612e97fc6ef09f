"""MLflow models-from-code entry point: the logged model is this file, not a pickle."""
import mlflow

from ecomcap.registry.pyfunc import CaptionModel

mlflow.models.set_model(CaptionModel())
