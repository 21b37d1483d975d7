"""The AI pipeline of ``workflows/ai_pipeline.py``: drafted, reviewed, published, paid once.

The shop's own app runs in an in-process worker (``durable.testing.TestEnv``) against the test
database. LLM calls are counted in ``ai_llm_calls``: the count must equal the number of
questions however often the workflow is replayed. The embedder is the real model when its
package is installed, else the labelled fallback; both are checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from durable import Durable
from durable.activation import activate
from durable.admin import resume
from durable.testing import TestEnv
from tasks import llm
from tasks.ai import llm_call_count, published
from tests.apps.shop_env import shop_app
from tests.conftest import wait_until
from workflows.ai_pipeline import QUESTIONS, REVIEW_WINDOW

EXPECTED_EMBEDDER = llm.MINILM_LABEL if llm.minilm_available() else llm.HASHING_LABEL


@pytest.fixture(scope="module")
def shop(database_url: str, redis_url: str) -> Iterator[Durable]:
    with shop_app(database_url, redis_url) as durable:
        yield durable


@pytest.fixture
def env(shop: Durable) -> Iterator[TestEnv]:
    with TestEnv(shop) as test_env:
        yield test_env


class EchoClient:
    """A client plugged in through ``SHOP_LLM_CLIENT``: cites the closest passage."""

    name = "echo-client"

    def complete(self, prompt: str) -> str:
        question, passages = llm.parse_prompt(prompt)
        return f"{question} -> {passages[0][0]}"


def wait_for_review(durable: Durable, workflow_id: str) -> None:
    wait_until(
        lambda: durable.get_event(workflow_id, "status") == "awaiting review",
        timeout=90,
        what=f"{workflow_id} to wait for its review",
    )


def test_answers_are_published_once_approved_and_each_llm_call_is_made_once(
    shop: Durable, env: TestEnv
) -> None:
    run = shop.start("ai.answer_questions", workflow_id="faq-approved")
    wait_for_review(shop, run.id)
    assert llm_call_count(run.id) == len(QUESTIONS)
    # Force replays from the top: each returns the committed answers without calling the LLM.
    for _ in range(3):
        wait_until(lambda: activate(shop, run.id) == "suspended", timeout=10, what="a replay")
    resume(shop, run.id)
    drafts = shop.get_event(run.id, "drafts")
    shop.signal(run.id, "review", {"approved": True, "reviewer": "dana"})

    result = env.result(run, timeout=60)
    assert result == {
        "status": "published",
        "reviewer": "dana",
        "answers": len(QUESTIONS),
        "documents": 4,
        "chunks": result["chunks"],
        "embedder": EXPECTED_EMBEDDER,
        "model": llm.STAND_IN_NAME,
    }
    assert llm_call_count(run.id) == len(QUESTIONS)
    rows = published(run.id)
    assert [(r["question"], r["answer"], r["sources"]) for r in rows] == [
        (d["question"], d["answer"], d["sources"]) for d in drafts
    ]
    assert {r["reviewer"] for r in rows} == {"dana"}
    assert all(r["answer"].startswith(f"[{llm.STAND_IN_NAME}]") for r in rows)
    assert_answers_found_in_the_right_documents(rows)


def assert_answers_found_in_the_right_documents(rows: list[dict[str, Any]]) -> None:
    """Retrieval worked: each question's passages include its document, the facts came out."""
    documents = [{s.split("#")[0] for s in r["sources"]} for r in rows]
    wanted = ["returns", "returns", "payments", "shipping", "warranty"]
    assert all(want in found for want, found in zip(wanted, documents, strict=True)), documents
    facts = [(0, "30 days"), (2, "24 hours"), (3, "12 EUR")]
    assert all(fact in rows[n]["answer"] for n, fact in facts), [r["answer"] for r in rows]


def test_a_plugged_in_client_is_used_and_a_rejection_publishes_nothing(
    shop: Durable, env: TestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_LLM_CLIENT", "tests.test_ai_pipeline:EchoClient")
    llm.use_llm(None)  # read SHOP_LLM_CLIENT again
    try:
        questions = QUESTIONS[:2]
        run = shop.start("ai.answer_questions", "policies", questions, workflow_id="faq-no")
        wait_for_review(shop, run.id)
        drafts = shop.get_event(run.id, "drafts")
        shop.signal(run.id, "review", {"approved": False, "reviewer": "sam"})
        result = env.result(run, timeout=60)
    finally:
        llm.use_llm(None)
    assert [d["answer"].split(" -> ")[0] for d in drafts] == questions
    assert {d["model"] for d in drafts} == {"echo-client"}
    assert (result["status"], result["reviewer"], result["model"]) == (
        "rejected",
        "sam",
        "echo-client",
    )
    assert published(run.id) == []
    assert llm_call_count(run.id) == 2


def test_an_unreviewed_run_expires_after_three_days_with_the_fallback_embedder(
    shop: Durable, env: TestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_EMBEDDER", "hashing")
    run = shop.start("ai.answer_questions", workflow_id="faq-late")
    result = env.result(run, timeout=60)
    assert (result["status"], result["embedder"]) == ("expired", llm.HASHING_LABEL)
    assert_answers_found_in_the_right_documents(shop.get_event(run.id, "drafts"))
    assert env.skipped >= REVIEW_WINDOW.total_seconds() - 60
    assert published(run.id) == []
    assert shop.get_event(run.id, "status") == "expired"


def test_the_embedder_is_the_model_when_installed_else_the_labelled_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOP_EMBEDDER", "hashing")
    label, vectors = llm.embed(["Free returns within 30 days.", "Free returns within 30 days."])
    assert label == llm.HASHING_LABEL and "fallback" in label
    assert vectors[0] == vectors[1] == llm.hashing_embed("free RETURNS within 30 days")
    assert len(vectors[0]) == llm.DIMENSIONS
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0)

    monkeypatch.setenv("SHOP_EMBEDDER", "auto")
    label, (vector,) = llm.embed(["How long do I have to return an item?"])
    assert label == EXPECTED_EMBEDDER
    assert len(vector) == llm.DIMENSIONS
    if not llm.minilm_available():
        monkeypatch.setenv("SHOP_EMBEDDER", "minilm")
        with pytest.raises(RuntimeError, match="pip install"):
            llm.embed(["x"])
