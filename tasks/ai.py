"""Tasks of the AI pipeline: fetch documents, chunk and embed them, draft answers, publish.

Their data lives in PostgreSQL next to the shop's (``SHOP_DATABASE_URL``, by default
``DURABLE_DATABASE_URL``), in three tables created when first used:

- ``ai_chunks``: each chunk of a run's documents with its embedding, keyed by (collection,
  chunk id), so a re-run of the embedding step overwrites rather than duplicates;
- ``ai_llm_calls``: one row per call of the LLM client, whatever became of its answer, so
  that a test (or an invoice) shows how many calls were paid for;
- ``ai_answers``: the answers a reviewer approved, keyed by (workflow id, position).

The models are in :mod:`tasks.llm`: a pluggable LLM client (by default a deterministic local
stand-in, not a language model) and an embedder (all-MiniLM-L6-v2 when its package is
installed, else a labelled hashing fallback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ARRAY,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB, insert

from config.celery_app import app
from durable import current_step
from tasks import llm, store

DOCUMENTS = Path(__file__).resolve().parent / "documents"
CHUNK_CHARS = 400
TOP_K = 3

metadata = MetaData()

chunks = Table(
    "ai_chunks",
    metadata,
    Column("collection", Text, primary_key=True),
    Column("chunk_id", Text, primary_key=True),
    Column("doc_id", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("embedding", ARRAY(Float), nullable=False),
    Column("embedder", Text, nullable=False),
)

llm_calls = Table(
    "ai_llm_calls",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("workflow_id", Text),
    Column("idempotency_key", Text),
    Column("question", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", DateTime(timezone=True), server_default=func.now()),
)

answers = Table(
    "ai_answers",
    metadata,
    Column("workflow_id", Text, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("question", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("sources", JSONB, nullable=False),
    Column("model", Text, nullable=False),
    Column("reviewer", Text, nullable=False),
    Column("approved_at", DateTime(timezone=True), server_default=func.now()),
)

_CREATE_LOCK_KEY = 5_817_202_612  # held while creating the tables (tasks.store uses ...611)


def engine() -> Engine:
    """The shop's engine for this process, with the pipeline's tables created."""
    return store.engine_with(metadata, _CREATE_LOCK_KEY)


# -- the steps -------------------------------------------------------------------------------


@app.task
def fetch_documents(corpus: str) -> list[dict[str, str]]:
    """The documents of ``corpus``: ``{id, title, text}`` each, in name order.

    Here they are the Markdown files shipped in ``tasks/documents/<corpus>/``; in production
    this step would call the CMS or the file store, which is why it is a step that retries.
    """
    folder = DOCUMENTS / corpus
    if not folder.is_dir():
        raise FileNotFoundError(f"no document corpus named {corpus!r} in {DOCUMENTS}")
    documents = []
    for path in sorted(folder.glob("*.md")):
        body = path.read_text(encoding="utf-8")
        title = next((line[2:] for line in body.splitlines() if line.startswith("# ")), path.stem)
        documents.append({"id": path.stem, "title": title, "text": body})
    return documents


def chunk_documents(documents: list[dict[str, str]]) -> list[dict[str, str]]:
    """Split documents into chunks of whole paragraphs, at most about ``CHUNK_CHARS`` each.

    Cheap and deterministic: the workflow runs it as a local step.
    """
    result = []
    for doc in documents:
        paragraphs = [p.strip() for p in doc["text"].split("\n\n") if p.strip()]
        paragraphs = [p for p in paragraphs if not p.startswith("# ")]
        pieces: list[list[str]] = [[]]
        for paragraph in paragraphs:
            if pieces[-1] and len(" ".join([*pieces[-1], paragraph])) > CHUNK_CHARS:
                pieces.append([])
            pieces[-1].append(" ".join(paragraph.split()))
        result += [_chunk(doc, n, piece) for n, piece in enumerate(pieces, 1) if piece]
    return result


def _chunk(doc: dict[str, str], number: int, paragraphs: list[str]) -> dict[str, str]:
    return {"chunk_id": f"{doc['id']}#{number}", "doc_id": doc["id"], "text": " ".join(paragraphs)}


@app.task
def embed_chunks(collection: str, items: list[dict[str, str]]) -> dict[str, Any]:
    """Embed the chunks and store them under ``collection``; returns what was used.

    The result names the embedder (the model, or the labelled fallback) and its dimensions.
    Storing is an upsert, so a re-run after a crash overwrites its own rows.
    """
    label, vectors = llm.embed([item["text"] for item in items])
    rows = [
        {**item, "collection": collection, "embedding": vector, "embedder": label}
        for item, vector in zip(items, vectors, strict=True)
    ]
    stmt = insert(chunks).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["collection", "chunk_id"],
        set_={"text": stmt.excluded.text, "embedding": stmt.excluded.embedding},
    )
    with engine().begin() as conn:
        conn.execute(stmt)
    return {"embedder": label, "dimensions": len(vectors[0]) if vectors else 0, "chunks": len(rows)}


def retrieve(collection: str, question: str, k: int = TOP_K) -> list[tuple[str, str]]:
    """The ``k`` chunks of ``collection`` closest to ``question``, as (chunk id, text)."""
    _, (wanted,) = llm.embed([question])
    query = select(chunks.c.chunk_id, chunks.c.text, chunks.c.embedding).where(
        chunks.c.collection == collection
    )
    with engine().connect() as conn:
        rows = list(conn.execute(query))
    ranked = sorted(rows, key=lambda r: (-llm.cosine(wanted, list(r.embedding)), r.chunk_id))
    return [(row.chunk_id, row.text) for row in ranked[:k]]


@app.task
def draft_answer(collection: str, question: str) -> dict[str, Any]:
    """Answer one question from the closest chunks with one LLM call.

    Each call of the client is logged in ``ai_llm_calls`` first. Once this step's result is
    committed, replaying the workflow returns it without calling the model again.
    """
    passages = retrieve(collection, question)
    client = llm.llm()
    step = current_step()
    call = {
        "workflow_id": step.workflow_id,
        "idempotency_key": step.idempotency_key,
        "question": question,
        "model": client.name,
        "pid": os.getpid(),
    }
    with engine().begin() as conn:
        conn.execute(llm_calls.insert().values(call))
    reply = client.complete(llm.build_prompt(question, passages))
    sources = [source for source, _ in passages]
    return {"question": question, "answer": reply, "sources": sources, "model": client.name}


@app.task
def publish_answers(workflow_id: str, drafts: list[dict[str, Any]], reviewer: str) -> int:
    """Store the approved answers (an upsert: harmless to repeat); returns how many."""
    rows = [
        {
            "workflow_id": workflow_id,
            "position": position,
            "question": draft["question"],
            "answer": draft["answer"],
            "sources": draft["sources"],
            "model": draft["model"],
            "reviewer": reviewer,
        }
        for position, draft in enumerate(drafts, 1)
    ]
    if not rows:
        return 0
    stmt = insert(answers).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["workflow_id", "position"],
        set_={"answer": stmt.excluded.answer, "reviewer": stmt.excluded.reviewer},
    )
    with engine().begin() as conn:
        conn.execute(stmt)
    return len(rows)


def llm_call_count(workflow_id: str) -> int:
    """How many times the LLM client was called for the run's steps."""
    query = select(func.count()).where(llm_calls.c.workflow_id == workflow_id)
    with engine().connect() as conn:
        return int(conn.execute(query).scalar_one())


def published(workflow_id: str) -> list[dict[str, Any]]:
    """The run's approved answers, in order."""
    query = select(answers).where(answers.c.workflow_id == workflow_id).order_by(answers.c.position)
    with engine().connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]
