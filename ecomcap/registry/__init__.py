"""MLflow tracking helpers, model packaging, and the registry promotion gate."""
