import torch

from proposers.candidates import EMPTY, CandidateTable, prune_empty
from proposers.templates import TreeTemplate, chain
from proposers.tree import compile_tree

TEMPLATE = TreeTemplate("t", top_k=2, max_depth=2, paths=((0,), (1,), ("R",), (0, 0), ("R", "R")))


def test_feedback_fills_topk_columns_by_depth():
    table = CandidateTable(compile_tree(TEMPLATE))
    table.set_feedback(torch.tensor([[11, 12, 13], [21, 22, 23]]))
    assert table.table[:, :2].tolist() == [[11, 12], [21, 22]]
    table.set_feedback(torch.tensor([[31, 32]]))
    assert table.table[:, :2].tolist() == [[31, 32], [EMPTY, EMPTY]]


def test_retrieval_column_and_node_tokens():
    tree = compile_tree(TEMPLATE)
    table = CandidateTable(tree)
    table.set_feedback(torch.tensor([[11, 12], [21, 22]]))
    ctx = torch.tensor([1, 2, 3, 40, 41, 2, 3])
    table.set_retrieval(ctx)
    assert table.table[:, 2].tolist() == [40, 41]
    tokens, keep = table.node_tokens(3, ctx)
    # nodes: (0) (1) (R) (0,0) (R,R)
    assert tokens.tolist() == [3, 11, 12, 40, 21, 41]
    assert keep.tolist() == list(range(6))


def test_noise_comes_from_the_context():
    tree = compile_tree(chain(5))
    gen = torch.Generator().manual_seed(1)
    table = CandidateTable(tree, gen)
    ctx = torch.tensor([100, 200, 300])
    tokens, _ = table.node_tokens(7, ctx)
    assert tokens[0] == 7 and set(tokens[1:].tolist()) <= {100, 200, 300}


def test_pruning_drops_empty_nodes_and_their_descendants():
    tree = compile_tree(chain(4, "R"))
    table = CandidateTable(tree, fill_noise=False)
    ctx = torch.tensor([1, 2, 9, 1, 2])  # retrieval finds [9, 1, 2]: 3 of 4 depths
    table.set_retrieval(ctx)
    tokens, keep = table.node_tokens(2, ctx)
    assert tokens.tolist() == [2, 9, 1, 2] and keep.tolist() == [0, 1, 2, 3]
    empty = torch.tensor([False, True, False, False])
    assert prune_empty(tree, empty).tolist() == [0, 1]


def test_retrieval_column_takes_a_chain_looked_up_elsewhere():
    """`set_retrieval(context, found)`: the chain the caller found (the vLLM proposer's
    index, or the shared corpus) fills the column, cut to the table's depth; without it
    the table looks the context up itself."""
    from proposers.candidates import EMPTY, CandidateTable
    from proposers.templates import load_template
    from proposers.tree import compile_tree

    tree = compile_tree(load_template("retrieval-10"))
    table = CandidateTable(tree, fill_noise=False)
    context = torch.tensor([4, 5, 6, 7, 4, 5])
    table.set_retrieval(context)
    own = table.table[:, table.top_k].clone()
    assert own[:4].tolist() == [6, 7, 4, 5] and (own[4:] == EMPTY).all()
    table.set_retrieval(context, found=list(range(100, 100 + tree.max_depth + 5)))
    assert table.table[:, table.top_k].tolist() == list(range(100, 100 + tree.max_depth))
    table.set_retrieval(context, found=[])
    assert (table.table[:, table.top_k] == EMPTY).all()
