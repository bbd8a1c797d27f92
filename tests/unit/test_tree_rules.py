"""Name safety, collisions and relative-path placement (product.md's rules)."""

from __future__ import annotations

import contextlib
import logging
import posixpath
from collections.abc import Iterator
from urllib.parse import quote

import trio
from hypothesis import given
from hypothesis import strategies as st

from fsmount.blob import InlineBlob
from fsmount.sources.grand_challenge import ArchiveDirectory, GrandChallenge
from fsmount.tree import (
    Directory,
    File,
    Node,
    PathBuilder,
    TreeContext,
    is_normal_relative_path,
    safe_name,
    unique_names,
)


def ctx() -> TreeContext:
    return TreeContext(lambda keys: {k: 1.0 for k in keys})


def file_at(data: bytes = b"x"):
    return lambda name: File(name, InlineBlob(data))


def directory_at(path: str, context: TreeContext | None = None) -> Directory:
    """An empty directory at `path` below a mount root (nodes know their place by parents)."""
    context = context or ctx()
    *parents, name = path.split("/")
    node = Directory(name, context)
    for parent in reversed(parents):
        node = Directory(parent, context, children=[node])
    root = Directory("", context, children=[node])
    found: Directory = root
    for part in path.split("/"):
        child = found.cached().get(part)  # type: ignore[union-attr]
        assert isinstance(child, Directory)
        found = child
    return found


def walk(nodes: list[Node]) -> dict[str, Node]:
    out: dict[str, Node] = {}
    for node in nodes:
        out[node.path] = node
        if isinstance(node, Directory):
            out.update(walk(list(trio.run(node.children).nodes)))
    return out


def test_safe_name_replaces_slash_drops_nul_and_hides_no_dotfile() -> None:
    assert safe_name("a/b", "id") == "a_b"
    assert safe_name("a\0b", "id") == "ab"
    assert safe_name(".hidden", "id") == "_hidden"
    assert safe_name("..", "id") == "_."
    assert safe_name("", "fallback") == "fallback"
    assert safe_name("é\u0301", "id") == "é\u0301"  # no Unicode normalisation


def test_every_member_of_a_clash_gets_its_id() -> None:
    names = unique_names([("Heroes", "c1"), ("Props", "c2"), ("Heroes", "c3")])
    assert names == ["Heroes (c1)", "Props", "Heroes (c3)"]


def test_only_normal_relative_paths_are_accepted() -> None:
    for good in ("a.json", "files/report.pdf", "images/ct"):
        assert is_normal_relative_path(good)
    for bad in ("", "/etc/passwd", "../x", "a/../b", "./x", "a//b", "a/", "a\0b", "a/./b"):
        assert not is_normal_relative_path(bad), bad


def test_builder_places_nested_files_and_first_claim_wins(caplog) -> None:
    base = directory_at("gc/a/item")
    builder = PathBuilder(base)
    caplog.set_level(logging.WARNING)
    assert builder.add_file("files/report.pdf", file_at(b"1"), "first")
    assert not builder.add_file("files/report.pdf", file_at(b"2"), "same path")
    assert not builder.add_file("files/report.pdf/x.json", file_at(), "file as dir")
    assert not builder.add_file("../escape.json", file_at(), "escape")
    assert builder.add_files_in("images/ct", [("1.mha", file_at())], "image")
    assert not builder.add_files_in("images/ct", [("2.mha", file_at())], "image again")
    assert builder.add_files_in("", [("3.mha", file_at())], "generic image")
    tree = walk(base.install(builder.nodes()).nodes)
    assert set(tree) == {
        "gc/a/item/files",
        "gc/a/item/files/report.pdf",
        "gc/a/item/images",
        "gc/a/item/images/ct",
        "gc/a/item/images/ct/1.mha",
        "gc/a/item/3.mha",
    }
    report = tree["gc/a/item/files/report.pdf"]
    assert isinstance(report, File) and report.blob == report.blob
    assert isinstance(report.blob, InlineBlob) and report.blob.data == b"1"
    assert "escape" in caplog.text and "already taken" in caplog.text


# Path parts an API could send, chosen to hit every rule: traversal, empty and absolute parts,
# separators inside names, NUL, non-ASCII; joined into components, then into paths.
PARTS = ["..", ".", "", "/", "\0", "a", "b", "é"]
components = st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map("".join)
hostile_paths = st.lists(components, min_size=1, max_size=5).map("/".join)
any_path = st.one_of(hostile_paths, st.text(max_size=12))


def is_one_safe_component(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 255
    )


@contextlib.contextmanager
def dropped_names() -> Iterator[list[str]]:
    """What the tree says it left out because a directory already had an entry of that name
    (it keeps the first and logs the rest): a builder that produced two must be caught."""
    dropped: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "two entries named" in record.getMessage():
                dropped.append(record.getMessage())

    tree_log = logging.getLogger("fsmount.tree")
    handler, level = Catch(), tree_log.level
    tree_log.addHandler(handler)
    tree_log.setLevel(logging.WARNING)
    try:
        yield dropped
    finally:
        tree_log.removeHandler(handler)
        tree_log.setLevel(level)


def assert_inside(parent: str, nodes: list[Node]) -> None:
    """Every node is one safe component below `parent`, and resolving it stays there."""
    for node in nodes:
        assert is_one_safe_component(node.name), node.name
        assert node.path == f"{parent}/{node.name}", (parent, node.path)
        resolved = posixpath.normpath(posixpath.join("/", parent, node.name))
        assert posixpath.dirname(resolved) == "/" + parent, (parent, node.name, resolved)
        if isinstance(node, Directory):
            assert_inside(node.path, list(trio.run(node.children).nodes))


@given(
    st.lists(
        st.tuples(st.booleans(), any_path, st.lists(components, max_size=3)),
        min_size=1,
        max_size=12,
    )
)
def test_no_path_ever_leaves_its_directory_and_names_are_unique(values) -> None:
    """Values at arbitrary `relative_path`s (files, or image directories holding files)."""
    base = directory_at("root/item")
    with dropped_names() as dropped:
        builder = PathBuilder(base)
        placed: list[str] = []
        for index, (is_image, path, names) in enumerate(values):
            if is_image:  # file names in it come from the source, made safe as sources must
                safe = (safe_name(name, f"f{n}") for n, name in enumerate(names))
                files = [(name, file_at()) for name in dict.fromkeys(safe)]
                if builder.add_files_in(path, files, f"image {index}"):
                    placed += [f"{path}/{name}" if path else name for name, _ in files]
            elif builder.add_file(path, file_at(), f"value {index}"):
                placed.append(path)
        nodes = list(base.install(builder.nodes()).nodes)
        assert_inside("root/item", nodes)
        tree = walk(nodes)
    assert dropped == []
    # What was accepted is where it was asked to be; nothing else is there.
    files = {p for p, node in tree.items() if isinstance(node, File)}
    assert files == {f"root/item/{p}" for p in placed}
    for path in placed:
        assert is_normal_relative_path(path), path


@given(
    st.lists(
        st.tuples(st.one_of(hostile_paths, st.text(max_size=8)), st.text(min_size=1, max_size=6)),
        max_size=10,
    )
)
def test_directory_names_from_services_are_safe_and_distinct(entries) -> None:
    """Collection and model names (with their ids) become one directory each."""
    pairs = [(safe_name(name, ident), ident) for name, ident in entries]
    names = unique_names(pairs)
    assert len(names) == len(entries)
    for name in names:
        assert is_one_safe_component(name) and not name.startswith("."), name
        resolved = posixpath.normpath(posixpath.join("/scenario/collections", name))
        assert posixpath.dirname(resolved) == "/scenario/collections", name
    idents = [ident for _, ident in entries]
    if len(set(idents)) == len(idents):  # the services' ids are unique
        assert len(set(names)) == len(names), names
        with dropped_names() as dropped:
            parent = directory_at("scenario/collections")
            parent.install([File(name) for name in names])
        assert dropped == []
        assert {n.path for n in parent.cached().nodes} == {  # type: ignore[union-attr]
            f"scenario/collections/{name}" for name in names
        }


@given(
    st.lists(
        st.tuples(st.sampled_from(["Value", "File", "Image"]), any_path, components, components),
        min_size=1,
        max_size=10,
    )
)
def test_grand_challenge_values_at_any_path_stay_inside_their_item(values) -> None:
    """What the API sends (relative paths, image pks, stored file names) through the source's
    own placement: nothing outside the item, no two entries with one name."""
    raw_values, images = [], {}
    for index, (kind, path, image_pk, stored) in enumerate(values):
        raw_values.append(
            {
                "pk": index,
                "interface": {"super_kind": kind, "relative_path": path, "slug": f"s{index}"},
                "value": index,
                "file": f"https://gc.test/media/files/{index}/{quote(stored)}",
                "image": f"https://gc.test/api/v1/cases/images/{index}/",
            }
        )
        images[f"cases/images/{index}/"] = {
            "pk": image_pk,
            "files": [
                {"pk": f"{index}a", "file": f"https://gc.test/media/i/{quote(stored)}.mha"},
                {"pk": f"{index}b", "file": f"https://gc.test/media/i/{quote(stored)}.mhd"},
            ],
        }
    api = Api({"archives/items/": page([{"pk": "item", "values": raw_values}])} | images)
    context = ctx()
    source = GrandChallenge(api, context)  # type: ignore[arg-type]
    archive = ArchiveDirectory("a", source, "archive-pk", {})
    Directory("", context, children=[Directory("grand-challenge", children=[archive])])

    async def list_the_item() -> list[Node]:
        item = (await archive.children()).get("item")
        assert isinstance(item, Directory)
        return list((await item.children()).nodes)

    with dropped_names() as dropped:
        nodes = trio.run(list_the_item)  # the archive's listing, then the item's, as a walk does
        assert_inside("grand-challenge/a/item", nodes)
    assert dropped == []


def page(results: list[dict[str, object]]) -> dict[str, object]:
    return {"count": len(results), "next": None, "previous": None, "results": results}


class Api:
    """The API as the source sees it: pages and details by path (the images listing is empty,
    so each image is asked for alone, as one added after the listing would be)."""

    base_url = "https://gc.test/api/v1/"

    def __init__(self, answers: dict[str, dict[str, object]]) -> None:
        self._answers = answers

    async def get_json(self, path: str, params: object = None, **_: object) -> object:
        return self._answers.get(path, page([]))
