"""Stat-ahead, in process: which sizes are guessed, in which order, and how many at once."""

from __future__ import annotations

from fsmount.blob import BlobStat, RemoteBlob, SignedUrl
from fsmount.lookahead import StatAhead
from fsmount.tree import Directory, File, TreeContext


async def never() -> SignedUrl:
    raise AssertionError("no URL is needed here")


class Sizes:
    """What StatAhead asks of Content, answering from a dict; guesses are recorded."""

    def __init__(self) -> None:
        self.sizes: dict[str, BlobStat] = {}
        self.guessed: list[str] = []

    def known(self, blob: RemoteBlob) -> BlobStat | None:
        return self.sizes.get(blob.key)

    recalled = known

    def recall_many(self, blobs: object) -> None:
        pass

    def guess(self, blob: RemoteBlob) -> None:
        assert not blob.costly_probe, blob.key
        self.guessed.append(blob.key)


def archive(items: int, *, backwards: bool = False, costly: bool = False) -> list[Directory]:
    """`root/grand-challenge/archive/<item>/{a,b/c}`, items listed in name order or in the
    reverse; returns the item directories as listed."""
    ctx = TreeContext(lambda keys: {k: 1.0 for k in keys})
    names = [f"item-{n:03d}" for n in range(items)]
    if backwards:
        names.reverse()

    def file(name: str, key: str) -> File:
        return File(name, RemoteBlob(key, never, key, costly_probe=costly))

    dirs = [
        Directory(
            name,
            children=[file("a", f"{name}/a"), Directory("b", children=[file("c", f"{name}/b/c")])],
        )
        for name in names
    ]
    top = Directory("archive", children=dirs)
    Directory("", ctx, children=[Directory("grand-challenge", children=[top])])
    return dirs


def files_of(item: Directory) -> list[File]:
    a = item.cached().get("a")  # type: ignore[union-attr]
    c = item.cached().get("b").cached().get("c")  # type: ignore[union-attr]
    assert isinstance(a, File) and isinstance(c, File)
    return [a, c]


def test_one_stat_guesses_nothing() -> None:
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(10)
    assert ahead.known(files_of(items[3])[0]) is None
    assert sizes.guessed == []


def test_two_stats_in_listing_order_guess_what_comes_next_a_window_at_a_time() -> None:
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(10)
    ahead.known(files_of(items[0])[0])
    ahead.known(files_of(items[0])[1])  # item-000/b/c follows item-000/a
    assert sizes.guessed == []  # the item has nothing after c
    ahead.known(files_of(items[1])[0])  # the next item: the walk is the archive's
    assert sizes.guessed == ["item-001/b/c", "item-002/a", "item-002/b/c", "item-003/a"]
    for file in files_of(items[1])[1:] + files_of(items[2]):  # hits move the window on
        ahead.known(file)
    assert sizes.guessed[4:] == ["item-003/b/c", "item-004/a", "item-004/b/c"]


def test_two_stats_in_name_order_guess_by_name() -> None:
    """`du ARCHIVE/*`: the shell sorted the names, the listing has its own order."""
    sizes = Sizes()
    ahead = StatAhead(sizes, window=3)  # type: ignore[arg-type]
    items = sorted(archive(10, backwards=True), key=lambda d: d.name)
    ahead.known(files_of(items[0])[1])
    ahead.known(files_of(items[1])[0])
    assert sizes.guessed == ["item-001/b/c", "item-002/a", "item-002/b/c"]


def test_stats_far_apart_in_both_orders_guess_nothing() -> None:
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(40)
    ahead.known(files_of(items[2])[0])
    ahead.known(files_of(items[30])[0])
    assert sizes.guessed == []


def test_what_costs_a_conversion_is_never_guessed() -> None:
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(10, costly=True)
    for item in items[:3]:
        for file in files_of(item):
            ahead.known(file)
    assert sizes.guessed == []


def test_known_sizes_are_not_guessed_and_answer_at_once() -> None:
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(10)
    sizes.sizes["item-001/b/c"] = BlobStat(5, 1.0)
    ahead.known(files_of(items[0])[1])
    ahead.known(files_of(items[1])[0])
    assert "item-001/b/c" not in sizes.guessed
    assert ahead.known(files_of(items[1])[1]) == BlobStat(5, 1.0)


def test_guessed_files_listed_with_their_sizes_move_the_window_on() -> None:
    """The kernel takes a size a listing gave and never asks for it (`du` enters a folder
    after its guesses came back): the listing itself must count as the walk's progress."""
    sizes = Sizes()
    ahead = StatAhead(sizes, window=4)  # type: ignore[arg-type]
    items = archive(10)
    ahead.known(files_of(items[0])[1])
    ahead.known(files_of(items[1])[0])
    assert len(sizes.guessed) == 4  # item-001/b/c .. item-003/a
    for key in sizes.guessed:
        sizes.sizes[key] = BlobStat(5, 1.0)
    for file in files_of(items[1])[1:] + files_of(items[2]):  # listed, sizes known: no
        assert ahead.listed(file) == BlobStat(5, 1.0)  # stat will come for them
    assert sizes.guessed[4:] == ["item-003/b/c", "item-004/a", "item-004/b/c"]
    assert ahead.listed(files_of(items[9])[0]) is None  # not guessed: nothing moves
    assert len(sizes.guessed) == 7
