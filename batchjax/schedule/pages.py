"""Host-side KV page accounting: a refcounted pool and the two prefix caches of the baselines.

Pages are numbered 1..num_pages; 0 is the null page (`step_plan.NULL_PAGE`) and is never
handed out. A page is free when nobody holds it. The caches hold their own reference on every
page they index, so a cached page that no request uses stays allocated but evictable: it is
reclaimed, least recently used first, only when a fresh page is needed.
"""

from __future__ import annotations

import collections
import heapq
from typing import Iterable, Sequence


class PagesExhausted(RuntimeError):
    """More pages were asked for than are free (or evictable)."""


class PagePool:
    """Refcounted pages 1..num_pages, handed out lowest-freed-first for reproducible tables."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._refcount = [0] * (num_pages + 1)
        self._free: collections.deque[int] = collections.deque(range(1, num_pages + 1))
        self.peak_allocated = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_available(self) -> int:
        """Same interface as the caches: what an allocation can get."""
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_allocated

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PagesExhausted(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        self.peak_allocated = max(self.peak_allocated, self.num_allocated)
        return pages

    def retain(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"page {p} is not allocated")
            self._refcount[p] += 1

    def release(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"page {p} released more often than held")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)


class HashedPageCache:
    """vLLM-style automatic prefix caching: full pages indexed by a chained hash of their tokens.

    Page k of a prompt is keyed by (key of page k-1, tokens of page k), so a key names the
    whole prefix up to that page. Any unreferenced cached page may be evicted (LRU, with a
    request's tail pages queued before its head pages, as vLLM frees them), which can strand
    its descendants: they stay cached but no longer match, and age out in turn.
    """

    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self._page_of_key: dict[int, int] = {}
        self._key_of_page: dict[int, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_available(self) -> int:
        """Pages an allocation can get: free ones plus cached ones nobody uses."""
        return self.pool.num_free + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        """Pages held by requests (cached pages nobody uses are free memory in waiting)."""
        return self.pool.num_allocated - len(self._evictable)

    def page_keys(self, token_ids: Sequence[int]) -> list[int]:
        keys, key = [], 0
        for start in range(0, len(token_ids) - self.page_size + 1, self.page_size):
            key = hash((key, tuple(token_ids[start : start + self.page_size])))
            keys.append(key)
        return keys

    def match(self, keys: Sequence[int], max_pages: int) -> list[int]:
        """Cached pages of the longest matching run of full pages; the caller now holds them."""
        pages = []
        for key in keys[:max_pages]:
            page = self._page_of_key.get(key)
            if page is None:
                break
            pages.append(page)
        for p in pages:
            self._evictable.pop(p, None)
        self.pool.retain(pages)
        return pages

    def insert(self, keys: Sequence[int], pages: Sequence[int]) -> None:
        """Index a request's computed full pages (the first page per key wins)."""
        for key, page in zip(keys, pages):
            if key in self._page_of_key or page in self._key_of_page:
                continue
            self._page_of_key[key] = page
            self._key_of_page[page] = key
            self.pool.retain([page])

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise PagesExhausted(f"asked for {n} pages, {self.num_available} available")
        while self.pool.num_free < n:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of_key[self._key_of_page.pop(page)]
            self.pool.release([page])
        return self.pool.allocate(n)

    def release(self, pages: Sequence[int]) -> None:
        """A request lets go of its page table; cached pages left unused become evictable."""
        for p in reversed(pages):
            self.pool.release([p])
            if p in self._key_of_page and self.pool.refcount(p) == 1:
                self._evictable[p] = None


class _RadixNode:
    __slots__ = ("parent", "key", "page", "children", "last_access")

    def __init__(self, parent: _RadixNode | None, key: tuple[int, ...], page: int):
        self.parent = parent
        self.key = key
        self.page = page
        self.children: dict[tuple[int, ...], _RadixNode] = {}
        self.last_access = 0


class RadixPageCache:
    """SGLang-style radix cache over token sequences whose KV lives in pages.

    Matching is at page granularity: each tree edge is exactly one full page of tokens, so a
    prompt reuses the longest run of whole pages it shares with a cached sequence (SGLang with
    page_size > 1 behaves the same). Only leaves are evicted, least recently used first, so a
    cached prefix is never cut out from under its continuations.
    """

    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self._root = _RadixNode(None, (), 0)
        self._node_of_page: dict[int, _RadixNode] = {}
        self._clock = 0
        # (last_access, page) of leaves nobody uses; stale entries are skipped on pop.
        self._leaf_heap: list[tuple[int, int]] = []
        self._num_evictable = 0

    @property
    def num_available(self) -> int:
        return self.pool.num_free + self._num_evictable

    @property
    def num_in_use(self) -> int:
        return self.pool.num_allocated - self._num_evictable

    def _is_evictable(self, node: _RadixNode) -> bool:
        return self.pool.refcount(node.page) == 1

    def _pages(self, token_ids: Sequence[int], max_pages: int) -> list[tuple[int, ...]]:
        n = min(len(token_ids) // self.page_size, max_pages)
        return [tuple(token_ids[i * self.page_size : (i + 1) * self.page_size]) for i in range(n)]

    def match_len(self, token_ids: Sequence[int]) -> int:
        """Cached tokens a prompt would reuse (no side effects), for longest-prefix ordering."""
        node, n = self._root, 0
        for key in self._pages(token_ids, len(token_ids)):
            node = node.children.get(key)
            if node is None:
                break
            n += self.page_size
        return n

    def match(self, token_ids: Sequence[int], max_pages: int) -> list[int]:
        self._clock += 1
        node, pages = self._root, []
        for key in self._pages(token_ids, max_pages):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            if self._is_evictable(node):
                self._num_evictable -= 1
            node.last_access = self._clock
            pages.append(node.page)
        self.pool.retain(pages)
        return pages

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> None:
        self._clock += 1
        node = self._root
        for key, page in zip(self._pages(token_ids, len(pages)), pages):
            child = node.children.get(key)
            if child is None:
                if page in self._node_of_page:
                    break  # this page already backs another branch; keep the tree a tree
                child = _RadixNode(node, key, page)
                node.children[key] = child
                self._node_of_page[page] = child
                self.pool.retain([page])
            elif child.page != page:
                # Computed twice concurrently: the request does not hold the cached copy, and
                # hanging its pages below it would pin a node the request cannot release.
                break
            child.last_access = self._clock
            node = child

    def _evict_one(self) -> None:
        while True:
            access, page = heapq.heappop(self._leaf_heap)
            node = self._node_of_page.get(page)
            if node is None or node.children or node.last_access != access:
                continue
            if not self._is_evictable(node):
                continue
            break
        del node.parent.children[node.key]
        del self._node_of_page[page]
        self._num_evictable -= 1
        self.pool.release([page])
        parent = node.parent
        if parent is not self._root and not parent.children and self._is_evictable(parent):
            heapq.heappush(self._leaf_heap, (parent.last_access, parent.page))

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise PagesExhausted(f"asked for {n} pages, {self.num_available} available")
        while self.pool.num_free < n:
            self._evict_one()
        return self.pool.allocate(n)

    def release(self, pages: Sequence[int]) -> None:
        for p in reversed(pages):
            self.pool.release([p])
            node = self._node_of_page.get(p)
            if node is not None and self._is_evictable(node):
                self._num_evictable += 1
                if not node.children:
                    heapq.heappush(self._leaf_heap, (node.last_access, p))
