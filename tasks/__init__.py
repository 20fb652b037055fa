"""The orchestration side: Prefect tasks over `moe`, the artifact stores (local folder, S3), the
subprocess launcher, and the MLflow tracking and registry glue.

Nothing here imports torch: every GPU/torch stage runs as a `python -m moe ...` child process,
so a flow process stays light and a stuck stage can be killed without killing the flow.
"""
