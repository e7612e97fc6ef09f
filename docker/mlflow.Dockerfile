# MLflow tracking server for k8s/mlflow.yaml (PostgreSQL backend, MinIO artifacts, basic auth).
# The upstream MLflow image has neither psycopg2 nor boto3, and runs as root.
#   docker build -f docker/mlflow.Dockerfile -t <registry>/mlflow:3.17.2 .
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/requirements-mlflow.txt /tmp/requirements-mlflow.txt
RUN python -m pip install --no-cache-dir -r /tmp/requirements-mlflow.txt \
 && groupadd --gid 10001 mlflow \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
