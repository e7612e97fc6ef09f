"""The registered retriever: encoder and gallery index together, as an MLflow pyfunc.

`predict` takes query texts (a DataFrame column "query_text" or a list of strings) and returns
the top-10 item ids and scores over the gallery it was registered with, so
`mlflow models serve -m models:/ecomcap-retriever@champion` answers searches.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc


class RetrieverModel(mlflow.pyfunc.PythonModel):
    """pyfunc: query texts in, top-10 (item_ids, scores) out."""

    def load_context(self, context) -> None:
        from ecomcap.retrieval.index.gallery import load_gallery
        from ecomcap.retrieval.index.open import open_index
        from ecomcap.retrieval.serve.search import query_encoder

        self.gallery = load_gallery(context.artifacts["gallery"])
        self.encode = query_encoder(self.gallery)  # the text tower that made the gallery
        self.index = open_index(self.gallery, build=False)  # the index the gate scored; a server is only read

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema from hints
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):  # a "query_text" column, else the first one
            col = "query_text" if "query_text" in model_input else model_input.columns[0]
            texts = [str(t) for t in model_input[col].tolist()]
        else:
            texts = [str(t) for t in model_input]
        k = int((params or {}).get("top_k", 10))
        scores, idx = self.index.search(self.encode(texts), k)
        return pd.DataFrame({"query_text": texts,
                             "item_ids": [[self.gallery.item_ids[j] for j in row if j >= 0] for row in idx],
                             "scores": [[round(float(s), 6) for s, j in zip(srow, row) if j >= 0]
                                        for srow, row in zip(scores, idx)]})


def log_retriever(gallery_dir: str | Path, name: str = "model") -> str:
    """Log gallery (with its encoder) as a pyfunc model of the active run, through the shared
    packaging helper (this file is the models-from-code entry); returns the model URI."""
    from ecomcap.registry.pyfunc import log_code_model

    return log_code_model(__file__, {"gallery": str(gallery_dir)}, REQUIREMENTS, name).model_uri


REQUIREMENTS = ["torch", "transformers>=5,<6", "pillow", "pandas", "pydantic>=2", "pyarrow", "numpy",
                "safetensors", "tqdm", "faiss-cpu", "pymilvus>=3,<4"]

mlflow.models.set_model(RetrieverModel())  # what MLflow loads when it runs this file as the model
