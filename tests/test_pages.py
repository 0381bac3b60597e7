"""The refcounted page pool and the two prefix caches of the baselines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.schedule.pages import HashedPageCache, PagePool, PagesExhausted, RadixPageCache
from batchjax.schedule.step_plan import NULL_PAGE


def test_pool_never_hands_out_the_null_page_and_refuses_past_its_size():
    pool = PagePool(4)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    with pytest.raises(PagesExhausted):
        pool.allocate(1)


def test_a_shared_page_is_freed_only_by_its_last_holder():
    pool = PagePool(2)
    [page] = pool.allocate(1)
    pool.retain([page])
    pool.release([page])
    assert pool.num_free == 1
    pool.release([page])
    assert pool.num_free == 2
    with pytest.raises(ValueError):
        pool.release([page])


def _cache(kind: str, num_pages: int, page_size: int = 2):
    pool = PagePool(num_pages)
    cls = HashedPageCache if kind == "hashed" else RadixPageCache
    return cls(pool, page_size)


def _match(cache, tokens, max_pages=100):
    if isinstance(cache, HashedPageCache):
        return cache.match(cache.page_keys(tokens), max_pages)
    return cache.match(tokens, max_pages)


def _insert(cache, tokens, pages):
    if isinstance(cache, HashedPageCache):
        cache.insert(cache.page_keys(tokens)[: len(pages)], pages)
    else:
        cache.insert(tokens[: len(pages) * cache.page_size], pages)


@pytest.mark.parametrize("kind", ["hashed", "radix"])
def test_cached_full_pages_are_reused_up_to_the_first_difference(kind):
    cache = _cache(kind, 8)
    first = [1, 2, 3, 4, 5, 6, 7]
    pages = cache.allocate(4)
    _insert(cache, first, pages[:3])  # three full pages of 2 tokens
    assert _match(cache, [1, 2, 3, 4, 9, 9, 9]) == pages[:2]
    assert _match(cache, [1, 2, 3, 4, 5, 6], max_pages=2) == pages[:2]
    assert _match(cache, [2, 2]) == []


@pytest.mark.parametrize("kind", ["hashed", "radix"])
def test_unused_cached_pages_are_evicted_least_recently_used_first(kind):
    cache = _cache(kind, 4)
    a, b = [1, 1, 1, 1], [2, 2, 2, 2]
    pages_a = cache.allocate(2)
    _insert(cache, a, pages_a)
    cache.release(pages_a)
    pages_b = cache.allocate(2)
    _insert(cache, b, pages_b)
    cache.release(pages_b)
    assert cache.num_available == 4 and cache.num_in_use == 0
    _match(cache, b)  # b is now the most recently used, and held
    cache.release(pages_b)
    fresh = cache.allocate(2)
    assert set(fresh) == set(pages_a)  # a went first
    assert _match(cache, b) == pages_b


@pytest.mark.parametrize("kind", ["hashed", "radix"])
def test_pages_a_request_holds_are_never_evicted(kind):
    cache = _cache(kind, 3)
    pages = cache.allocate(2)
    _insert(cache, [5, 5, 6, 6], pages)
    assert cache.num_available == 1
    with pytest.raises(PagesExhausted):
        cache.allocate(2)


def test_radix_cache_evicts_a_prefix_only_after_its_continuations():
    cache = _cache("radix", 3)
    pages = cache.allocate(3)
    _insert(cache, [1, 1, 2, 2, 3, 3], pages)
    cache.release(pages)
    _match(cache, [1, 1])  # touch the head: a hashed LRU would now evict the tail first anyway
    cache.release([pages[0]])
    assert cache.allocate(1) == [pages[2]]
    assert cache.match_len([1, 1, 2, 2, 3, 3]) == 4


@pytest.mark.parametrize("kind", ["hashed", "radix"])
@settings(max_examples=80, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=10), min_size=1,
                     max_size=12),
    num_pages=st.integers(5, 12),
)
def test_admitting_requests_through_a_cache_never_hands_out_a_held_page(kind, prompts, num_pages):
    """Requests come and go; each page it gets is free, or a cached page with its tokens."""
    cache = _cache(kind, num_pages)
    holders: dict[int, tuple] = {}  # page -> tokens it holds, for the pages of live requests
    live: list[list[int]] = []
    for tokens in prompts:
        while live and cache.num_available < 5:
            cache.release(live.pop(0))
        matched = _match(cache, tokens, (len(tokens) - 1) // 2)
        for k, page in enumerate(matched):
            assert cache.pool.refcount(page) >= 2
            held = holders.get(page)
            assert held is None or held == tuple(tokens[: 2 * (k + 1)])
        need = -(-len(tokens) // 2) - len(matched)
        if need > cache.num_available:
            cache.release(matched)
            continue
        fresh = cache.allocate(need)
        live_pages = {p for pages in live for p in pages}
        assert not live_pages & set(fresh)
        pages = matched + fresh
        for k, page in enumerate(pages):
            holders[page] = tuple(tokens[: 2 * (k + 1)])
        _insert(cache, tokens, pages[: len(tokens) // 2])
        live.append(pages)
        assert cache.num_in_use <= num_pages
        assert cache.num_available + len(live_pages | set(pages)) == num_pages
