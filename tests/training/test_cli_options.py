"""The shared flag groups: one declaration per flag, the same objects for the CLI and the
benchmark scripts."""

import argparse

import pytest

from bench.make_perf_bundle import PerfBundleConfig, config_from_args
from bench.make_perf_bundle import _parser as perf_bundle_parser
from bench.rerank_quality import _parser as rerank_parser
from bench.train_quality import _parser as train_quality_parser
from training.__main__ import _parser as cli_parser
from training.cli_options import (
    add_model_flags,
    index_options,
    key_values,
    model_options,
    train_config,
)
from training.errors import ConfigError
from training.trainer import TrainConfig


def test_cli_train_defaults_are_the_train_configs():
    args = cli_parser().parse_args(["train", "--data", "synthetic", "--out", "run"])
    config = train_config(args)
    expected = TrainConfig(
        model_options={"max_len": 50, "dim": 64, "dropout": 0.2, "use_time": True}
    )
    assert config == expected


def test_fixed_fields_win_and_the_options_are_checked_against_the_fixed_model():
    args = train_quality_parser().parse_args(["--data", "synthetic", "--epochs", "3"])
    config = train_config(args, model="two_tower", loss="ccl", seed=2)
    assert (config.model, config.loss, config.seed, config.epochs) == ("two_tower", "ccl", 2, 3)
    assert config.model_options == {"max_len": 200, "dim": 64, "dropout": 0.2}
    args.layers = 3  # a flag the suite's parser does not have, as if it had
    with pytest.raises(ConfigError, match="--model two_tower has no option"):
        model_options(args, "two_tower")


def test_benchmark_scripts_keep_their_own_defaults():
    quality = train_quality_parser().parse_args(["--data", "synthetic"])
    assert (quality.epochs, quality.eval_every, quality.max_len) == (200, 2, 200)
    assert not hasattr(quality, "model") and not hasattr(quality, "seed")
    rerank = rerank_parser().parse_args([])
    assert rerank.data == "ml-1m:../shared/data/ml-1m" and rerank.models_dir is None
    assert (rerank.epochs, rerank.eval_every, rerank.max_len, rerank.dim) == (200, 2, 200, 64)
    # --seed and --threads are the heads' and torch's; the retriever keeps seed 0.
    rerank = rerank_parser().parse_args(["--seed", "4", "--threads", "2"])
    assert (rerank.head_seed, rerank.torch_threads) == (4, 2)
    assert train_config(rerank).seed == 0 and train_config(rerank).threads == 0
    assert config_from_args(perf_bundle_parser().parse_args([])) == PerfBundleConfig()


def test_perf_bundle_flags_set_the_config_fields_they_are_named_after():
    argv = ["--model", "sasrec", "--dim", "8", "--nprobe", "4", "--rescore", "50"]
    config = config_from_args(perf_bundle_parser().parse_args(argv))
    assert (config.model, config.dim, config.index_options) == (
        "sasrec",
        8,
        {"nprobe": 4, "rescore": 50},
    )
    with pytest.raises(SystemExit):
        perf_bundle_parser().parse_args(["--model", "nextitnet"])


def test_key_values_parse_numbers_and_booleans_and_refuse_a_pair_without_value():
    assert key_values(["a=1", "b=0.5", "c=true", "d=x"], "--loss-option") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "x",
    }
    with pytest.raises(ConfigError, match="--loss-option expects KEY=VALUE, got 'a'"):
        key_values(["a"], "--loss-option")


def test_index_options_are_the_overrides_given():
    args = argparse.Namespace(nprobe=None, rescore=100)
    assert index_options(args) == {"rescore": 100}
    assert index_options(argparse.Namespace()) == {}


def test_a_flag_outside_its_group_is_a_programming_error():
    with pytest.raises(ValueError, match="the model flags have no --epochs"):
        add_model_flags(argparse.ArgumentParser(), "--epochs")
