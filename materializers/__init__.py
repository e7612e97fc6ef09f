"""ZenML materializers: Parquet dataset directory, model directory, evaluation report.

Filled by the pipeline issue.
"""
