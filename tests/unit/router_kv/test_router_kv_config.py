"""Router flags: Dynamo's names, defaults, aliases and environment variables."""

from __future__ import annotations

import argparse

import pytest

from armature.router.kv import KvRouterConfig, add_router_args


def parse(argv: list[str]) -> KvRouterConfig:
    return KvRouterConfig.from_args(add_router_args(argparse.ArgumentParser()).parse_args(argv))


def test_defaults_match_dynamo() -> None:
    cfg = parse([])
    assert cfg == KvRouterConfig()
    assert (cfg.overlap_score_weight, cfg.router_temperature, cfg.use_kv_events) == (1.0, 0.0, True)
    assert (cfg.router_ttl_secs, cfg.router_max_tree_size, cfg.router_prune_target_ratio) == (120.0, 2**20, 0.8)
    assert (cfg.router_replica_sync, cfg.router_reset_states) == (False, False)
    assert (cfg.router_track_active_blocks, cfg.router_assume_kv_reuse, cfg.kv_cache_block_size) == (True, True, None)


def test_flags_and_old_aliases() -> None:
    cfg = parse([
        "--router-kv-overlap-score-weight", "2.5", "--router-temperature", "0.3", "--no-router-kv-events",
        "--router-ttl-secs", "30", "--router-max-tree-size", "1000", "--router-prune-target-ratio", "0.5",
        "--router-replica-sync", "--router-reset-states", "--no-track-active-blocks",
        "--no-router-assume-kv-reuse", "--kv-cache-block-size", "64",
    ])
    assert cfg == KvRouterConfig(
        overlap_score_weight=2.5, router_temperature=0.3, use_kv_events=False, router_ttl_secs=30,
        router_max_tree_size=1000, router_prune_target_ratio=0.5, router_replica_sync=True,
        router_reset_states=True, router_track_active_blocks=False, router_assume_kv_reuse=False,
        kv_cache_block_size=64,
    )
    old = parse(["--kv-overlap-score-weight", "0", "--no-kv-events", "--router-block-size", "16"])
    assert (old.overlap_score_weight, old.use_kv_events, old.kv_cache_block_size) == (0.0, False, 16)


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT", "0.5")
    monkeypatch.setenv("DYN_ROUTER_USE_KV_EVENTS", "false")
    monkeypatch.setenv("DYN_KV_CACHE_BLOCK_SIZE", "32")
    cfg = parse([])
    assert (cfg.overlap_score_weight, cfg.use_kv_events, cfg.kv_cache_block_size) == (0.5, False, 32)
    assert parse(["--router-kv-events"]).use_kv_events is True
    monkeypatch.setenv("DYN_ROUTER_USE_KV_EVENTS", "maybe")
    with pytest.raises(ValueError, match="DYN_ROUTER_USE_KV_EVENTS"):
        parse([])


@pytest.mark.parametrize(
    "argv",
    [
        ["--router-kv-overlap-score-weight", "-1"],
        ["--router-temperature", "-0.1"],
        ["--router-ttl-secs", "0"],
        ["--router-max-tree-size", "0"],
        ["--router-prune-target-ratio", "1.5"],
        ["--kv-cache-block-size", "0"],
    ],
)
def test_bad_values_are_rejected_with_the_flag_name(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0]):
        parse(argv)
