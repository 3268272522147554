"""Radix prefix cache over token ids, at page granularity.

Each tree edge is one full page of token ids, so a node owns exactly one KV page and the radix
of the tree is a page: matching, splitting and eviction never cut a page in half (a partial
trailing page is never shared). A request that reuses a prefix *locks* the path to its last
node (reference counts up to the root); unlocked leaves are evicted least recently used first.

The cache owns the pages of its nodes: ``insert`` takes ownership of pages it did not have and
tells the caller which of the caller's pages are duplicates to free. Every change is reported
as SGLang KV events whose block hashes are the shared sequence hashes of ``protocols.hashing``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from armature.protocols.hashing import chain_sequence_hashes, compute_local_block_hashes
from armature.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EngineKvEvent

EventSink = Callable[[EngineKvEvent], None]
FreePages = Callable[[list[int]], None]


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]  # the page's token ids; empty for the root
    page: int  # KV page index; -1 for the root
    parent: RadixNode | None
    block_hash: int | None = None  # sequence hash (chained from the root)
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass
class PrefixMatch:
    pages: list[int]  # one per matched full page, in order
    node: RadixNode  # deepest matched node (the root when nothing matched)

    @property
    def num_pages(self) -> int:
        return len(self.pages)


@dataclass
class InsertResult:
    pages: list[int]  # the cache's page for each inserted page position (canonical page table)
    duplicates: list[int]  # caller pages that the cache did not take (already cached): free them
    node: RadixNode  # the node of the last inserted page


class RadixCache:
    # Stale eviction entries tolerated beyond twice the node count before a rebuild.
    lru_slack = 1024

    def __init__(
        self,
        page_size: int,
        free_pages: FreePages,
        on_event: EventSink | None = None,
        *,
        lora_name: str | None = None,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self._free_pages = free_pages
        self._on_event = on_event
        self._lora_name = lora_name
        self._clock = itertools.count(1)
        self.root = RadixNode(key=(), page=-1, parent=None)
        self.root.lock_ref = 1  # the root is never evicted
        self._num_nodes = 0
        self._protected = 0  # nodes with lock_ref > 0 (the root excluded)
        # Eviction candidates, least recently used first, kept as the tree changes so that an
        # eviction in a full pool costs O(pages freed · log n), not a walk of the whole tree.
        # Entries go stale (touched since, locked, grown children, evicted) and are skipped when
        # popped; every unlocked leaf has at least one entry with its current access time.
        self._lru: list[tuple[int, int, RadixNode]] = []

    # --- sizes -----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return True

    @property
    def total_pages(self) -> int:
        return self._num_nodes

    @property
    def protected_pages(self) -> int:
        return self._protected

    @property
    def evictable_pages(self) -> int:
        return self._num_nodes - self._protected

    # --- lookups ---------------------------------------------------------------------------

    def _pages_of(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i * ps : (i + 1) * ps]) for i in range(len(tokens) // ps)]

    def match_prefix(self, tokens: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of ``tokens`` made of full pages; refreshes its LRU time."""
        node = self.root
        pages: list[int] = []
        now = next(self._clock)
        for key in self._pages_of(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            pages.append(child.page)
            node = child
        self._offer(node)
        return PrefixMatch(pages=pages, node=node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        """Cache the full pages of ``tokens`` whose KV lives in ``pages`` (one page per page)."""
        keys = self._pages_of(tokens)
        if len(pages) < len(keys):
            raise ValueError(f"{len(keys)} full pages of tokens but only {len(pages)} KV pages")
        node = self.root
        now = next(self._clock)
        out: list[int] = []
        dups: list[int] = []
        new_nodes: list[RadixNode] = []
        new_parent: RadixNode | None = None
        for i, key in enumerate(keys):
            child = node.children.get(key)
            if child is None:
                if new_nodes and new_nodes[-1] is not node:
                    # A run of new pages can only continue from the previous new node; anything
                    # else would be a second run, which tokens of one sequence cannot produce.
                    raise AssertionError("insert produced two separate runs of new pages")
                child = RadixNode(key=key, page=pages[i], parent=node)
                node.children[key] = child
                self._num_nodes += 1
                if not new_nodes:
                    new_parent = node
                new_nodes.append(child)
            elif child.page != pages[i]:
                dups.append(pages[i])
            child.last_access = now
            out.append(child.page)
            node = child
        if new_nodes:
            assert new_parent is not None
            self._hash_and_publish(new_parent, new_nodes)
        self._offer(node)
        return InsertResult(pages=out, duplicates=dups, node=node)

    def _hash_and_publish(self, parent: RadixNode, nodes: list[RadixNode]) -> None:
        token_ids = [t for n in nodes for t in n.key]
        local = compute_local_block_hashes(token_ids, self.page_size, self._lora_name)
        hashes = chain_sequence_hashes(local, parent.block_hash)
        for n, h in zip(nodes, hashes):
            n.block_hash = h
        if self._on_event is not None:
            self._on_event(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=parent.block_hash,
                    token_ids=token_ids,
                    block_size=self.page_size,
                )
            )

    # --- locking ---------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        n: RadixNode | None = node
        while n is not None and not n.is_root:
            if n.lock_ref == 0:
                self._protected += 1
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: RadixNode) -> None:
        n: RadixNode | None = node
        while n is not None and not n.is_root:
            if n.lock_ref <= 0:
                raise AssertionError("unlock of a node that is not locked")
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= 1
                self._offer(n)
            n = n.parent

    # --- eviction --------------------------------------------------------------------------

    def _offer(self, node: RadixNode) -> None:
        """``node`` may have just become an unlocked leaf, or been touched while one."""
        if node.children or node.lock_ref or node.is_root:
            return
        heapq.heappush(self._lru, (node.last_access, id(node), node))
        if len(self._lru) > 2 * self._num_nodes + self.lru_slack:
            self._rebuild_lru()

    def _rebuild_lru(self) -> None:
        """Drop the stale entries: one walk, amortised over the pushes that made them."""
        heap: list[tuple[int, int, RadixNode]] = []
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n.lock_ref == 0:
                heap.append((n.last_access, id(n), n))
        heapq.heapify(heap)
        self._lru = heap

    @staticmethod
    def _current(entry: tuple[int, int, RadixNode]) -> bool:
        stamp, _, n = entry
        parent = n.parent
        return (
            stamp == n.last_access
            and not n.children
            and n.lock_ref == 0
            and parent is not None
            and parent.children.get(n.key) is n  # not evicted (nor replaced by a re-insert)
        )

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` unlocked pages, least recently used leaves first."""
        if num_pages <= 0:
            return 0
        freed: list[int] = []
        hashes: list[int] = []
        # self._lru, not a local: an offer below may rebuild it.
        while self._lru and len(freed) < num_pages:
            entry = heapq.heappop(self._lru)
            if not self._current(entry):
                continue
            leaf = entry[2]
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key]
            self._num_nodes -= 1
            freed.append(leaf.page)
            if leaf.block_hash is not None:
                hashes.append(leaf.block_hash)
            self._offer(parent)
        if freed:
            self._free_pages(freed)
            if self._on_event is not None:
                self._on_event(BlockRemoved(block_hashes=hashes))
        return len(freed)

    def reset(self) -> int:
        """Drop every node (all must be unlocked); returns the pages freed."""
        if self._protected:
            raise RuntimeError(f"cannot reset the prefix cache: {self._protected} pages are in use")
        pages: list[int] = []
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            pages.append(n.page)
            stack.extend(n.children.values())
        self.root.children.clear()
        self._lru.clear()
        self._num_nodes = 0
        if pages:
            self._free_pages(pages)
        if self._on_event is not None:
            self._on_event(AllBlocksCleared())
        return len(pages)


class NoPrefixCache(RadixCache):
    """``disable_radix_cache``: nothing is ever shared; pages stay with their request."""

    @property
    def enabled(self) -> bool:
        return False

    def match_prefix(self, tokens: Sequence[int]) -> PrefixMatch:
        return PrefixMatch(pages=[], node=self.root)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        raise RuntimeError("the prefix cache is disabled")
