"""Tests of the TokFSM dataset (codebook.data.fsm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codebook.data.fsm import FSMConfig, TokFSM, row_hashes


@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(FSMConfig())


def test_defaults_match_paper(fsm: TokFSM) -> None:
    assert fsm.transitions.shape == (100, 10)
    assert fsm.digits_per_state == 2
    assert fsm.vocab_size == 11
    assert fsm.bos_token_id == 10
    assert fsm.seq_len == 129


def test_transitions_rows_distinct_and_in_range(fsm: TokFSM) -> None:
    t = fsm.transitions
    assert t.dtype == np.int64
    assert t.min() >= 0 and t.max() < 100
    for row in t:
        assert len(set(row.tolist())) == 10
    # Uniform over all states: many different targets are used, and the graph is seed-fixed.
    assert len(np.unique(t)) > 90
    assert np.array_equal(TokFSM(FSMConfig()).transitions, t)
    assert not np.array_equal(TokFSM(FSMConfig(seed=43)).transitions, t)
    assert (fsm.adjacency.sum(axis=1) == 10).all()  # ten out-neighbours each


def test_transitions_can_self_loop() -> None:
    fsm = TokFSM(FSMConfig(num_states=5, num_edges=5, base=10))
    assert all(fsm.adjacency[s, s] for s in range(5))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_edges": 101}, "num_edges"),
        ({"num_edges": 0}, "num_edges"),
        ({"base": 1}, "base"),
        ({"num_states": 0}, "num_states"),
        ({"trajectory_states": 0}, "trajectory_states"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FSMConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=field):
        TokFSM(FSMConfig(**kwargs))


def test_digits_per_state_other_bases() -> None:
    assert TokFSM(FSMConfig(num_states=101, num_edges=3)).digits_per_state == 3
    assert TokFSM(FSMConfig(num_states=8, num_edges=3, base=2)).digits_per_state == 3
    assert TokFSM(FSMConfig(num_states=9, num_edges=3, base=2)).digits_per_state == 4
    assert TokFSM(FSMConfig(num_states=10, num_edges=3)).digits_per_state == 1


def test_encoding_most_significant_first_and_round_trip(fsm: TokFSM) -> None:
    assert fsm.encode_states(np.array([7, 42, 99, 0])).tolist() == [0, 7, 4, 2, 9, 9, 0, 0]
    rng = np.random.default_rng(0)
    states = rng.integers(100, size=(3, 5, 64))
    tokens = fsm.encode_states(states)
    assert tokens.shape == (3, 5, 128)
    assert np.array_equal(fsm.decode_tokens(tokens, has_bos=False), states)
    with pytest.raises(ValueError):
        fsm.encode_states(np.array([100]))


def test_sample_tokens_layout_and_decode(fsm: TokFSM) -> None:
    rng = np.random.default_rng(1)
    tokens = fsm.sample_tokens(16, rng)
    assert tokens.shape == (16, fsm.seq_len)
    assert tokens.dtype == np.int64
    assert (tokens[:, 0] == fsm.bos_token_id).all()
    assert (tokens[:, 1:] < 10).all() and (tokens[:, 1:] >= 0).all()
    states = fsm.decode_tokens(tokens)
    assert states.shape == (16, 64)
    assert np.array_equal(fsm.states_to_tokens(states), tokens)


def test_sampled_trajectories_follow_edges(fsm: TokFSM) -> None:
    states = fsm.sample_states(200, np.random.default_rng(2))
    a, b = states[:, :-1], states[:, 1:]
    assert fsm.adjacency[a, b].all()
    # Start states are spread over the state space, and edges are all used.
    assert len(np.unique(states[:, 0])) > 80
    taken = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    assert len(taken) > 0.9 * 100 * 10


def test_adjacency_is_the_transition_lists(fsm: TokFSM) -> None:
    a = 3
    neighbours = set(fsm.transitions[a].tolist())
    assert set(np.flatnonzero(fsm.adjacency[a]).tolist()) == neighbours


def test_state_labels_at_last_digit(fsm: TokFSM) -> None:
    tokens = fsm.states_to_tokens(np.array([[12, 34, 5]]))
    # BOS, 1, 2, 3, 4, 0, 5
    assert tokens.tolist() == [[10, 1, 2, 3, 4, 0, 5]]
    labels = fsm.state_labels(tokens)
    assert labels.tolist() == [[-1, -1, 12, -1, 34, -1, 5]]
    assert fsm.state_label_positions(3).tolist() == [2, 4, 6]

    rng = np.random.default_rng(3)
    tokens = fsm.sample_tokens(4, rng)
    labels = fsm.state_labels(tokens)
    assert labels.shape == tokens.shape
    pos = fsm.state_label_positions()
    assert pos[-1] == fsm.seq_len - 1
    assert np.array_equal(labels[:, pos], fsm.decode_tokens(tokens))
    others = np.setdiff1d(np.arange(fsm.seq_len), pos)
    assert (labels[:, others] == -1).all()
    assert (labels[:, 0] == -1).all()


def test_eval_set_fixed_and_prefix(fsm: TokFSM) -> None:
    e1 = fsm.eval_set(1500)
    assert e1.shape == (1500, fsm.seq_len)
    assert np.array_equal(fsm.eval_set(1500), e1)
    assert np.array_equal(fsm.eval_set(100), e1[:100])
    assert np.array_equal(TokFSM(FSMConfig()).eval_set(50), e1[:50])
    assert not np.array_equal(TokFSM(FSMConfig(seed=7)).eval_set(50), e1[:50])


def test_train_batch_deterministic_per_step(fsm: TokFSM) -> None:
    b5 = fsm.train_batch(5, 32, seed=0)
    assert b5.shape == (32, fsm.seq_len)
    assert np.array_equal(fsm.train_batch(5, 32, seed=0), b5)
    assert not np.array_equal(fsm.train_batch(6, 32, seed=0), b5)
    assert not np.array_equal(fsm.train_batch(5, 32, seed=1), b5)
    # The training loop's stream: a resumed one yields what an uninterrupted one would.
    from codebook.data.sources import fsm_train_batches

    full = fsm_train_batches(fsm, 8, seed=3, start=0, rank=0, world_size=1, eval_size=16)
    uninterrupted = [next(full)["input_ids"] for _ in range(6)]
    resumed = fsm_train_batches(fsm, 8, seed=3, start=4, rank=0, world_size=1, eval_size=16)
    assert torch.equal(next(resumed)["input_ids"], uninterrupted[4])
    assert torch.equal(next(resumed)["input_ids"], uninterrupted[5])


def test_train_excludes_eval(fsm: TokFSM) -> None:
    eval_tokens = fsm.eval_set(200)
    exclude = fsm.eval_hashes(200)
    assert len(exclude) == 200
    assert exclude == set(row_hashes(eval_tokens))
    train = np.concatenate([fsm.train_batch(s, 64, exclude=exclude) for s in range(10)])
    assert not (set(row_hashes(train)) & exclude)
    # Exclusion really drops rows: plant the eval rows as the "excluded" batch itself.
    planted = fsm.train_batch(0, 16, seed=9)
    kept = fsm.train_batch(0, 16, seed=9, exclude=set(row_hashes(planted[:5])))
    assert kept.shape == (16, fsm.seq_len)
    assert np.array_equal(kept[:11], planted[5:])
    assert not (set(row_hashes(kept)) & set(row_hashes(planted[:5])))


def test_row_hashes_dtype_independent() -> None:
    x = np.arange(12).reshape(3, 4)
    assert row_hashes(x.astype(np.int32)) == row_hashes(x.astype(np.int64))
    assert len(set(row_hashes(x))) == 3


def test_save_load_round_trip(fsm: TokFSM, tmp_path) -> None:
    path = fsm.save(tmp_path / "sub" / "fsm.json")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["fsm.json"]  # no temp file left
    loaded = TokFSM.load(path)
    assert loaded == fsm
    assert loaded.config == fsm.config
    assert np.array_equal(loaded.transitions, fsm.transitions)
    # The file is used as-is, not regenerated from the seed.
    data = json.loads(path.read_text())
    data["transitions"][0] = data["transitions"][1]
    path.write_text(json.dumps(data))
    assert np.array_equal(TokFSM.load(path).transitions[0], fsm.transitions[1])
    data["transitions"][0] = [0] * 10
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="distinct"):
        TokFSM.load(path)


def test_first_transition_accuracy(fsm: TokFSM) -> None:
    current = np.array([0, 1, 2, 3])
    perfect = fsm.adjacency[current].astype(np.float64)
    assert fsm.first_transition_accuracy(perfect, current) == 1.0
    worst = 1.0 - perfect
    assert fsm.first_transition_accuracy(worst, current) == 0.0
    # Row 0 gets 3 of its 10 neighbours in the top 10, the rest perfect -> (0.3 + 3) / 4.
    scores = perfect.copy()
    non = np.flatnonzero(~fsm.adjacency[0])[:7]
    scores[0] = 0.0
    scores[0, fsm.transitions[0, :3]] = 1.0
    scores[0, non] = 0.5
    assert fsm.first_transition_accuracy(scores, current) == pytest.approx((0.3 + 3) / 4)
