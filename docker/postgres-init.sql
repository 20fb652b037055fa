-- One Postgres holds both services' stores; the image creates the prefect database itself.
CREATE DATABASE mlflow;
