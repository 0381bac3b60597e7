"""The steps `experiments/bench_cascade.py` times: the same work laid out as a tree of shared
segments (system prompt > document) and as one level (the document's whole prefix)."""

from __future__ import annotations

from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

PAGE = 16
SYSTEM, DOC, QUESTION = 512, 768, 64


class _Pages:
    def __init__(self):
        self.next = 1

    def take(self, tokens: int) -> tuple[int, ...]:
        n = -(-tokens // PAGE)
        out = tuple(range(self.next, self.next + n))
        self.next += n
        return out


def _layouts(docs: int, per_doc: int, decode: bool) -> dict[str, StepPlan]:
    """The same step as a tree (system > document) and as one level (document prefix)."""
    plans = {}
    for kind in ("tree", "one level"):
        pages = _Pages()
        refs, chains = [], []
        if kind == "tree":
            system = PrefixRef(0, pages.take(SYSTEM), SYSTEM, 0)
            refs.append(system)
            for d in range(docs):
                doc = PrefixRef(1 + d, pages.take(DOC), DOC, 1)
                refs.append(doc)
                chains.append((0, 1 + d))
        else:
            for d in range(docs):
                refs.append(PrefixRef(d, pages.take(SYSTEM + DOC), SYSTEM + DOC, 0))
                chains.append((d,))
        chunks = []
        for d in range(docs):
            for i in range(per_doc):
                sid = d * per_doc + i
                if decode:  # the question and 16 generated tokens are in; one more
                    own = QUESTION + 16
                    chunks.append(ChunkWork(sid, (5,), own, pages.take(own + 1), chains[d][-1],
                                            SYSTEM + DOC, True, True, chains[d]))
                else:
                    chunks.append(ChunkWork(sid, (5,) * QUESTION, 0, pages.take(QUESTION),
                                            chains[d][-1], SYSTEM + DOC, True,
                                            prefix_chain=chains[d]))
        plans[kind] = StepPlan(0, tuple(chunks), tuple(refs))
    return plans


def _document_prefill() -> dict[str, StepPlan]:
    """512 tokens of a document right after the system prompt: a segment's chunk over its
    parent (tree), or the group prefix's own chunk from token 512 (one level)."""
    pages = _Pages()
    system = PrefixRef(0, pages.take(SYSTEM), SYSTEM, 0)
    doc_pages = pages.take(DOC)
    tree = StepPlan(0, (ChunkWork(-2, (5,) * 512, 0, doc_pages, 0, SYSTEM, False,
                                  prefix_chain=(0,)),), (system,))
    pages = _Pages()
    whole = pages.take(SYSTEM + DOC)
    one = StepPlan(0, (ChunkWork(-1, (5,) * 512, SYSTEM, whole, None, 0, False),), ())
    return {"tree": tree, "one level": one}


def step_pairs() -> dict[str, dict[str, StepPlan]]:
    return {"document prefill 512 after the system prompt": _document_prefill(),
            "question prefill 8 x 64 (1 document)": _layouts(1, 8, False),
            "question prefill 8 x 64 (4 documents x 2)": _layouts(4, 2, False),
            "decode 64 (4 documents x 16)": _layouts(4, 16, True),
            "decode 256 (16 documents x 16)": _layouts(16, 16, True)}
