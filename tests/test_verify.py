import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proposers.templates import TreeTemplate
from proposers.tree import compile_tree
from proposers.verify import accept, accepted_mask, sample_targets

TEMPLATE = TreeTemplate("hand", top_k=2, max_depth=3,
                        paths=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
TREE = compile_tree(TEMPLATE)  # nodes: 1=(0) 2=(1) 3=(0,0) 4=(0,1) 5=(1,0) 6=(0,0,0)


def test_no_match_emits_only_the_bonus():
    tokens = torch.tensor([7, 1, 2, 3, 4, 5, 6])
    target = torch.tensor([9, 0, 0, 0, 0, 0, 0])
    acc = accept(TREE, tokens, target)
    assert (acc.node, acc.num_accepted, acc.tokens) == (0, 0, [9])


def test_longest_path_wins_and_bonus_comes_from_its_end():
    tokens = torch.tensor([7, 10, 20, 30, 31, 21, 40])
    # root predicts 20 (node 2 matches), node 2 predicts 21 (node 5 matches): depth 2.
    # node 1 does not match the root, so the deeper node 6 under it is not accepted.
    target = torch.tensor([20, 30, 21, 40, 0, 99, 0])
    acc = accept(TREE, tokens, target)
    assert acc.path == [2, 5] and acc.num_accepted == 2
    assert acc.tokens == [20, 21, 99]


def test_full_chain_acceptance():
    tokens = torch.tensor([7, 10, 20, 30, 31, 21, 40])
    target = torch.tensor([10, 30, 0, 40, 0, 0, 55])
    acc = accept(TREE, tokens, target)
    assert acc.path == [1, 3, 6] and acc.tokens == [10, 30, 40, 55]


def test_ties_go_to_the_lowest_index_node():
    tokens = torch.tensor([7, 10, 10, 30, 31, 30, 40])  # nodes 1 and 2 carry the same token
    target = torch.tensor([10, 30, 30, 0, 0, 0, 0])
    acc = accept(TREE, tokens, target)
    assert acc.node == 3 and acc.path == [1, 3]


def _brute_force(paths, tokens, target):
    """Reference: walk every root-to-node path, keep the longest matching one."""
    index = {p: i + 1 for i, p in enumerate(paths)}
    best = []
    for path in paths:
        nodes = [index[path[:d]] for d in range(1, len(path) + 1)]
        prev, ok = 0, []
        for n in nodes:
            if tokens[n] != target[prev]:
                break
            ok.append(n)
            prev = n
        if len(ok) > len(best):
            best = ok
    return best


@st.composite
def random_trees(draw):
    top_k = draw(st.integers(1, 3))
    depth = draw(st.integers(1, 4))
    cols = list(range(top_k)) + ["R"]
    paths = set()
    frontier = [()]
    while frontier:
        parent = frontier.pop()
        if len(parent) == depth:
            continue
        for c in draw(st.lists(st.sampled_from(cols), max_size=3, unique=True)):
            child = parent + (c,)
            if child not in paths:
                paths.add(child)
                frontier.append(child)
    paths = sorted(paths, key=len)
    if not paths:
        paths = [(0,)]
    tree = compile_tree(TreeTemplate("rand", top_k, depth, tuple(paths)))
    n = tree.num_nodes + 1
    vocab = draw(st.integers(1, 4))  # tiny vocabulary -> many matches and ties
    tokens = draw(st.lists(st.integers(0, vocab), min_size=n, max_size=n))
    target = draw(st.lists(st.integers(0, vocab), min_size=n, max_size=n))
    return tree, torch.tensor(tokens), torch.tensor(target)


@settings(max_examples=300, deadline=None)
@given(random_trees())
def test_acceptance_matches_brute_force(case):
    tree, tokens, target = case
    acc = accept(tree, tokens, target)
    expected = _brute_force(list(tree.template.paths), tokens.tolist(), target.tolist())
    assert acc.num_accepted == len(expected)
    # Any maximal path yields the same tokens: each is the target at its parent.
    assert acc.tokens[:-1] == [int(tokens[n]) for n in acc.path]
    assert acc.tokens == [int(target[n]) for n in [0, *acc.path]]
    ok = accepted_mask(tree, tokens.numpy(), target.numpy())
    assert all(bool(ok[tree.parent[i]]) for i in range(1, tree.num_nodes + 1) if ok[i])


def test_sampling_targets():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_targets(logits, 0.0, 1.0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    # top_p small keeps only the most likely token.
    assert sample_targets(logits, 1.0, 0.01, gen).tolist() == [1, 0]
    draws = sample_targets(logits.expand(2000, 2, 3), 1.0, 1.0, gen)
    freq = (draws[:, 0] == 1).float().mean()
    expected = torch.softmax(logits[0], -1)[1]
    assert abs(float(freq) - float(expected)) < 0.05
