import torch

from proposers.templates import TreeTemplate
from proposers.tree import compile_tree

# root -> a(0) -> c(0,0)
#      -> b(1) -> d(1,R)
#      -> e(R)
TEMPLATE = TreeTemplate("hand", top_k=2, max_depth=2, paths=((0,), (1,), ("R",), (0, 0), (1, "R")))


def test_nodes_are_in_bfs_order_with_parents_first():
    t = compile_tree(TEMPLATE)
    assert t.num_nodes == 5
    assert t.depth.tolist() == [0, 1, 1, 1, 2, 2]
    assert t.parent.tolist() == [-1, 0, 0, 0, 1, 2]
    assert t.column.tolist() == [-1, 0, 1, 2, 0, 2]  # retrieval column = top_k
    assert all(t.parent[i] < i for i in range(1, 6))


def test_unsorted_template_is_ordered_by_depth():
    shuffled = TreeTemplate("s", 2, 2, ((0, 0), (1,), (0,)))
    t = compile_tree(shuffled)
    assert t.template.paths == ((1,), (0,), (0, 0))
    assert t.parent.tolist() == [-1, 0, 0, 2]


def test_mask_is_ancestor_or_self():
    t = compile_tree(TEMPLATE)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(t.ancestors, expected)


def test_positions_are_prefix_plus_depth():
    t = compile_tree(TEMPLATE)
    assert t.positions(10).tolist() == [10, 11, 11, 11, 12, 12]


def test_paths_and_feedback_chain():
    t = compile_tree(TEMPLATE)
    assert t.path_nodes[4].tolist() == [1, 4]
    assert t.path_nodes[3].tolist() == [3, -1]
    assert t.feedback_chain(0) == [1, 4]  # top-1 branch below the root
    assert t.feedback_chain(2) == [5]
    assert t.feedback_chain(4) == []


def test_subtree_keeps_order_and_remaps():
    t = compile_tree(TEMPLATE)
    sub = t.subtree(torch.tensor([0, 2, 5]))
    assert sub.num_nodes == 2
    assert sub.parent.tolist() == [-1, 0, 1]
    assert sub.template.paths == ((1,), (1, "R"))
    assert t.subtree(torch.arange(6)) is t


def test_is_chain():
    from proposers.templates import chain, load_template

    assert compile_tree(chain(5)).is_chain
    assert compile_tree(load_template("retrieval-10")).is_chain
    assert not compile_tree(TEMPLATE).is_chain
    assert not compile_tree(load_template("tree-8")).is_chain
