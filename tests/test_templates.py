import json

import pytest

from proposers.templates import (
    RETRIEVAL,
    TemplateError,
    TreeTemplate,
    available,
    chain,
    load_template,
)


def test_bundled_templates_load_and_validate():
    names = available()
    assert {"paper-68", "paper-68-r16", "tree-32", "tree-16", "tree-8", "chain-5",
            "retrieval-10"} <= set(names)
    for name in names:
        t = load_template(name)
        assert t.num_nodes > 0


def test_paper_template_shape():
    t = load_template("paper-68")
    assert t.num_nodes + 1 == 68  # the root plus 67 drafts
    assert t.top_k == 10 and t.depth == 5
    assert [p for p in t.paths if RETRIEVAL in p] == [(RETRIEVAL,) * d for d in range(1, 6)]


def test_default_tree_is_the_paper_tree_with_a_longer_retrieval_chain():
    """paper-68-r16 (the reference runner's tr-jacobi default) keeps paper-68's nodes and
    carries the retrieval chain on to depth 16 (the deepest a CUDA-graph step compacts)."""
    from proposers.reference.runner import DEFAULT_TEMPLATES, _GraphStep

    paper, t = load_template("paper-68"), load_template("paper-68-r16")
    assert DEFAULT_TEMPLATES["tr-jacobi"] == "paper-68-r16"
    assert t.paths[: paper.num_nodes] == paper.paths and t.top_k == paper.top_k
    assert t.paths[paper.num_nodes:] == tuple((RETRIEVAL,) * d for d in range(6, 17))
    assert t.num_nodes + 1 == 79 and t.depth == t.max_depth == 16 == _GraphStep.MAX_DEPTH


def test_chain_templates():
    c = chain(4)
    assert c.paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    r = chain(3, RETRIEVAL)
    assert r.uses_retrieval and r.paths[-1] == ("R", "R", "R")


@pytest.mark.parametrize(
    "paths, message",
    [
        ([[0, 1]], "has no parent"),
        ([[0], [0]], "duplicate"),
        ([[3]], "neither"),
        ([["X"]], "neither"),
        ([[0], [0, 0], [0, 0, 0]], "deeper than max_depth"),
        ([[]], "empty path"),
    ],
)
def test_invalid_templates_fail_with_a_clear_message(paths, message):
    with pytest.raises(TemplateError, match=message):
        TreeTemplate.from_dict({"top_k": 2, "max_depth": 2, "paths": paths}, name="bad")


def test_template_files(tmp_path):
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"top_k": 2, "paths": [[0], [1], [0, "R"]]}))
    t = load_template(str(good))
    assert t.name == "mine" and t.max_depth == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TemplateError, match="not valid JSON"):
        load_template(str(broken))
    with pytest.raises(TemplateError, match="malformed"):
        TreeTemplate.from_dict({"paths": [[0]]}, name="nokey")
    with pytest.raises(TemplateError, match="unknown template"):
        load_template("no-such-template")


def test_round_trip():
    t = load_template("tree-16")
    assert TreeTemplate.from_dict(t.to_dict(), name=t.name) == t
