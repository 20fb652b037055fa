# MLflow tracking server with the Postgres driver and boto3 for its S3 (MinIO) artifact store.
FROM python:3.11.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 boto3==1.44.8
USER nobody
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
