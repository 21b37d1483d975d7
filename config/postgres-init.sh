#!/bin/sh
# Run once by the postgres image on a new data volume (docker-compose.yml): the roles of
# docs/security.md#postgresql. durable_owner owns the database and runs `durable db upgrade`;
# durable_worker (workers, beats, the durable command) reads and writes rows, nothing else.
# The passwords come from the environment, passed as psql variables so no quoting breaks.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner_password="$DURABLE_OWNER_PASSWORD" \
    -v worker_password="$DURABLE_WORKER_PASSWORD" \
    -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE durable_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE durable_worker LOGIN PASSWORD :'worker_password';
ALTER DATABASE :"db" OWNER TO durable_owner;
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO durable_owner, durable_worker;
ALTER SCHEMA public OWNER TO durable_owner;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO durable_worker;
-- Tables and sequences the owner creates later (each `durable db upgrade`) are open to the
-- worker role for rows only: no DDL, no TRUNCATE.
ALTER DEFAULT PRIVILEGES FOR ROLE durable_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO durable_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE durable_owner IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO durable_worker;
SQL
