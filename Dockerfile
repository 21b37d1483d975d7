# The durable library, its CLI and the example shop app (config/, tasks/, workflows/).
# docker-compose.yml runs it as the migration job, the Celery worker, beat and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, in their own layer, so that a code change does not reinstall them.
# The install is editable: `durable db upgrade` reads the migrations from /app/alembic.
COPY pyproject.toml ./
RUN mkdir durable && touch durable/__init__.py \
    && pip install -e '.[crypto]' 'flower>=2.0' \
    && rm -r durable

COPY durable ./durable
COPY alembic ./alembic
COPY config ./config
COPY tasks ./tasks
COPY workflows ./workflows
RUN pip install --no-deps -e .

RUN useradd --create-home --uid 10001 durable
USER durable

CMD ["celery", "-A", "config.celery_app", "worker", "--loglevel=INFO"]
