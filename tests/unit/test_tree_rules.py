"""Name safety, collisions and relative-path placement (product.md's rules)."""

from __future__ import annotations

import logging

import trio
from hypothesis import given
from hypothesis import strategies as st

from fsmount.blob import InlineBlob
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
    return lambda name, path: File(name, path, blob=InlineBlob(data))


def walk(nodes: list[Node]) -> dict[str, Node]:
    out: dict[str, Node] = {}
    for node in nodes:
        out[node.path] = node
        if isinstance(node, Directory):
            out.update(walk(list(trio.run(node.children).values())))
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
    base = Directory("item", "gc/a/item", ctx(), children=[])
    builder = PathBuilder(base, ctx())
    caplog.set_level(logging.WARNING)
    assert builder.add_file("files/report.pdf", file_at(b"1"), "first")
    assert not builder.add_file("files/report.pdf", file_at(b"2"), "same path")
    assert not builder.add_file("files/report.pdf/x.json", file_at(), "file as dir")
    assert not builder.add_file("../escape.json", file_at(), "escape")
    assert builder.add_files_in("images/ct", [("1.mha", file_at())], "image")
    assert not builder.add_files_in("images/ct", [("2.mha", file_at())], "image again")
    assert builder.add_files_in("", [("3.mha", file_at())], "generic image")
    tree = walk(builder.nodes())
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


@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12))
def test_no_path_ever_leaves_its_directory_and_names_are_unique(paths: list[str]) -> None:
    base = Directory("item", "root/item", ctx(), children=[])
    builder = PathBuilder(base, ctx())
    for index, path in enumerate(paths):
        builder.add_file(path, file_at(), f"value {index}")
    tree = walk(builder.nodes())
    for path, node in tree.items():
        assert path.startswith("root/item/")
        parts = path.split("/")[2:]
        assert all(p not in ("", ".", "..") and "\0" not in p for p in parts)
        assert node.name == parts[-1]
    assert len(tree) == len(set(tree))


@given(st.lists(st.tuples(st.text(max_size=8), st.text(min_size=1, max_size=6)), max_size=10))
def test_directory_names_from_services_are_safe_and_distinct(entries) -> None:
    pairs = [(safe_name(name, ident), ident) for name, ident in entries]
    idents = [ident for _, ident in entries]
    names = unique_names(pairs)
    for name in names:
        assert "/" not in name and "\0" not in name and not name.startswith(".")
    if len(set(idents)) == len(idents):
        assert len(set(names)) == len(names)
