"""Fast checks of the vLLM plugin's pieces (no engine start).

The signature test is the tripwire for vLLM upgrades: the runner overrides private
methods, and if vLLM renames or reshapes one of them this test fails with the name.
"""

from __future__ import annotations

import inspect

import pytest
import torch

vllm = pytest.importorskip("vllm")

from proposers.vllm.planner import NONE, CostPlanner
from proposers.vllm.tree_attention import build_tree_step
from proposers.vllm.version import UnsupportedVLLMError, check_vllm_version

# What runner.py / tree_attention.py rely on, as of vLLM 0.32.0.
PRIVATE_API = {
    "_update_states": ["self", "scheduler_output"],
    "execute_model": ["self", "scheduler_output", "intermediate_tensors"],
    "_prepare_inputs": ["self", "scheduler_output", "num_scheduled_tokens"],
    "_sample": ["self", "logits", "spec_decode_metadata"],
    "propose_draft_token_ids": [
        "self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
        "hidden_states", "sample_hidden_states", "aux_hidden_states",
        "spec_decode_metadata", "common_attn_metadata", "slot_mappings",
    ],
    "load_model": ["self", "load_dummy_weights"],
}


def test_overridden_vllm_internals_unchanged():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for name, params in PRIVATE_API.items():
        got = list(inspect.signature(getattr(CPUModelRunner, name)).parameters)
        assert got == params, f"vLLM changed CPUModelRunner.{name}: {got}"
    fwd = list(inspect.signature(CPUAttentionBackendImpl.forward).parameters)
    assert fwd[:8] == ["self", "layer", "query", "key", "value", "kv_cache",
                       "attn_metadata", "output"], fwd
    upd = list(inspect.signature(CPUAttentionBackendImpl.do_kv_cache_update).parameters)
    assert upd == ["self", "layer", "key", "value", "kv_cache", "slot_mapping"], upd
    # Attributes the runner reads.
    src = inspect.getsource(CPUModelRunner.__mro__[1]._prepare_inputs)
    for attr in ("self.positions", "self.query_start_loc", "compute_slot_mapping"):
        assert attr in src, f"GPUModelRunner._prepare_inputs no longer uses {attr}"


def test_version_guard():
    assert check_vllm_version("0.32.0") == "0.32.0"
    with pytest.raises(UnsupportedVLLMError, match="tested with vLLM 0.32.x only.*0.33.1"):
        check_vllm_version("0.33.1")
    check_vllm_version()  # the installed one is tested


def test_tree_step_mask_and_slots():
    # Request 0: 3 cached tokens + a tree (root, a, b under root, c under a).
    # Request 1: 2 cached tokens + 2 causal tokens.
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    block_rows = torch.tensor([[5, 6], [7, 8]])
    step = build_tree_step([0, 4, 6], [3, 2], block_rows, 4, {0: anc})
    assert step.key_slots[0, :7].tolist() == [20, 21, 22, 23, 24, 25, 26]
    assert step.key_slots[1, :4].tolist() == [28, 29, 30, 31]
    assert step.mask[0, 3, :7].tolist() == [True] * 3 + [True, True, False, True]
    assert step.mask[1, 1, :4].tolist() == [True, True, True, True]
    assert step.mask[1, 0, :4].tolist() == [True, True, True, False]
    assert step.query_valid.sum() == 6
    assert step.query_index[step.query_valid].tolist() == list(range(6))


def test_planner_turns_speculation_off_when_it_does_not_pay():
    p = CostPlanner([("small", "tree"), ("big", "tree")])
    for _ in range(50):
        p.record_step("kernel", 8, 0.05)
        p.record_step("kernel", 300, 1.0)
        p.record_step("tree", 8 * 9, 0.20)
    p.record_request("small", 8, 0)  # nothing accepted, 4x the cost: never worth it
    choices = [p.choose(8) for _ in range(200)]
    assert choices.count(NONE) > 190


def test_planner_speculates_when_acceptance_is_high():
    p = CostPlanner([("small", "tree"), ("big", "tree")])
    for _ in range(50):
        p.record_step("kernel", 1, 0.05)
        p.record_step("kernel", 300, 0.5)
        p.record_step("tree", 9, 0.06)
    p.record_request("small", 8, 3)
    p.record_request("big", 30, 3)  # no more accepted for 4x the nodes
    choices = [p.choose(1) for _ in range(100)]
    assert choices.count("small") > 90


def test_general_plugin_entry_point(tmp_path, monkeypatch):
    """vLLM finds `register` through the entry point, and it is idempotent and gated."""
    import importlib

    from vllm.plugins import load_plugins_by_group
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from proposers.vllm.plugin import ENV_TREE_ATTN
    from proposers.vllm.tree_attention import BACKEND_PATH

    # A bare dist-info on sys.path is what an (editable) install provides.
    dist = tmp_path / "msn_trjacobi_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: msn-trjacobi-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nmsn_trjacobi = proposers.vllm.plugin:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "msn_trjacobi" in plugins
    cpu = AttentionBackendEnum.CPU_ATTN
    try:
        monkeypatch.delenv(ENV_TREE_ATTN, raising=False)
        plugins["msn_trjacobi"]()
        assert cpu.get_path() != BACKEND_PATH  # off unless asked for
        monkeypatch.setenv(ENV_TREE_ATTN, "1")
        plugins["msn_trjacobi"]()
        plugins["msn_trjacobi"]()
        assert cpu.get_path() == BACKEND_PATH
    finally:
        cpu.clear_override()
