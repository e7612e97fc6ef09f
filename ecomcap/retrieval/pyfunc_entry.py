"""MLflow models-from-code entry point for the retriever: the logged model is this file."""
import mlflow

from ecomcap.retrieval.pyfunc import RetrieverModel

mlflow.models.set_model(RetrieverModel())
