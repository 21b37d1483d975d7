"""Draft answers to customer questions from the shop's policies, publish them once approved.

The pipeline: fetch the policy documents, chunk them (a local step), embed the chunks, then
fan out one LLM call per question (each a step of its own, retried and checkpointed), publish
the drafts for review (an event), wait up to three days for a reviewer's decision (a signal),
and store the approved answers in PostgreSQL.

What durable adds: an LLM answer is paid for once. Its result is committed when the call
returns; a crash, a deploy or the many replays of this function (one per finished step, and
one for the review) return it from the store without calling the model again. A worker
killed during the fan-out re-runs only the calls that had not returned. The three-day review
holds no worker.

Start one and approve it::

    durable start ai.answer_questions --app workflows.ai_pipeline --id faq-1
    durable show faq-1                    # the drafts are in the events
    durable signal faq-1 review --payload '{"approved": true, "reviewer": "dana"}'

The models are in :mod:`tasks.llm`: by default a deterministic local stand-in (not an LLM)
and the all-MiniLM-L6-v2 embedder when its optional package is installed, a labelled
hashing fallback otherwise. Every result says which was used.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from config.celery_app import durable
from durable import RetryPolicy, SignalTimeout, WorkflowContext
from tasks.ai import chunk_documents, draft_answer, embed_chunks, fetch_documents, publish_answers

QUESTIONS = [
    "How long do I have to return an item?",
    "When will my refund arrive after I send a return?",
    "What happens if my card payment is declined?",
    "How much does express delivery cost?",
    "Is a faulty kettle covered after two years?",
]
REVIEW_WINDOW = timedelta(days=3)
# Model APIs rate-limit and time out: retry with back-off (durable timers, not countdowns).
LLM_RETRY = RetryPolicy(max_attempts=4, initial_interval=2.0, backoff=3.0, max_interval=60.0)
LLM_TIMEOUT = timedelta(minutes=2)
FETCH_RETRY = RetryPolicy(max_attempts=3, initial_interval=5.0)


@durable.workflow("ai.answer_questions")
def answer_questions(
    ctx: WorkflowContext, corpus: str = "policies", questions: list[str] | None = None
) -> dict[str, Any]:
    """Draft, review and publish answers; ``status`` is published, rejected or expired."""
    questions = questions or QUESTIONS
    documents = ctx.step(fetch_documents, corpus, retry=FETCH_RETRY)
    pieces = ctx.step(chunk_documents, documents, local=True)
    index = ctx.step(embed_chunks, ctx.workflow_id, pieces, retry=FETCH_RETRY)
    ctx.set_event("status", "drafting")
    drafts = ctx.parallel(
        [draft_answer.s(ctx.workflow_id, question) for question in questions],
        retry=LLM_RETRY,
        timeout=LLM_TIMEOUT,
    )
    ctx.set_event("drafts", drafts)
    ctx.set_event("status", "awaiting review")
    outcome = {
        "documents": len(documents),
        "chunks": index["chunks"],
        "embedder": index["embedder"],
        "model": drafts[0]["model"] if drafts else None,
    }
    try:
        review = ctx.wait_for_signal("review", timeout=REVIEW_WINDOW)
    except SignalTimeout:
        ctx.set_event("status", "expired")
        return {**outcome, "status": "expired"}
    if not review.get("approved"):
        ctx.set_event("status", "rejected")
        return {**outcome, "status": "rejected", "reviewer": review.get("reviewer")}
    stored = ctx.step(publish_answers, ctx.workflow_id, drafts, str(review["reviewer"]))
    ctx.set_event("status", "published")
    return {**outcome, "status": "published", "reviewer": review["reviewer"], "answers": stored}
