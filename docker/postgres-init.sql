-- Runs once, when the Postgres volume is first created: the Prefect server uses the database
-- named by POSTGRES_DB ("prefect"); MLflow's backend store gets its own.
CREATE DATABASE mlflow;
