"""Tests of the vectorised maze."""

import pytest
import torch

from env import NUM_ACTIONS, OBS_SIZE, Maze, maze_layout

UP, DOWN, LEFT, RIGHT = range(4)


def make(batch_size=3, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return Maze(batch_size=batch_size, generator=gen, **kw)


def test_layout_13():
    walls = maze_layout(13)
    assert int(walls.sum()) == 72
    assert int((~walls).sum()) == 97
    assert walls[0].all() and walls[-1].all() and walls[:, 0].all() and walls[:, -1].all()
    assert not walls[6, 6]  # centre free although both coordinates are even
    assert walls[2, 2] and walls[2, 4] and walls[10, 10]
    assert not walls[1, 2] and not walls[3, 3] and not walls[2, 5]


@pytest.mark.parametrize("size", [4, 3, 12])
def test_layout_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        maze_layout(size)


def test_reset_places_agent_at_centre_and_reward_on_free_non_centre_cells():
    env = make(batch_size=500, seed=1)
    env.reset()
    assert (env.position == 6).all()
    cells = env.reward_cell
    assert not env.walls[cells[:, 0], cells[:, 1]].any()
    assert not ((cells[:, 0] == 6) & (cells[:, 1] == 6)).any()
    # Uniform over the 96 candidates: with 500 draws nearly all candidates appear.
    assert len({tuple(c) for c in cells.tolist()}) > 80


def place(env, positions, rewards):
    """Put agents and reward cells at given (row, col) cells."""
    env.position = torch.tensor(positions)
    free = env.free_cells.tolist()
    env.reward_index = torch.tensor([free.index(list(r)) for r in rewards])


def test_moves_and_wall_bumps():
    env = make(batch_size=4, wall_penalty=0.5)
    env.reset()
    # From the centre (6,6) the four neighbours are free (odd coordinate in one axis).
    place(env, [[6, 6]] * 4, [[1, 1]] * 4)
    step = env.step(torch.tensor([UP, DOWN, LEFT, RIGHT]))
    assert env.position.tolist() == [[5, 6], [7, 6], [6, 5], [6, 7]]
    assert step.reward.tolist() == [0.0, 0.0, 0.0, 0.0]
    # Up from (5,6) is the pillar (4,6); the others are border walls.
    place(env, [[5, 6], [1, 1], [1, 1], [11, 11]], [[3, 3]] * 4)
    step = env.step(torch.tensor([UP, UP, LEFT, RIGHT]))
    assert env.position.tolist() == [[5, 6], [1, 1], [1, 1], [11, 11]]
    assert step.reward.tolist() == [-0.5, -0.5, -0.5, -0.5]


def test_reward_and_teleport_never_into_wall_or_reward_cell():
    env = make(batch_size=2000, seed=3)
    env.reset()
    # Every agent at (5,4), one step left of its reward cell (5,5).
    place(env, [[5, 4]] * 2000, [[5, 5]] * 2000)
    step = env.step(torch.full((2000,), RIGHT))
    assert (step.reward == 10.0).all()
    pos = env.position
    assert not env.walls[pos[:, 0], pos[:, 1]].any()
    assert not ((pos[:, 0] == 5) & (pos[:, 1] == 5)).any()
    # Uniform over the other 96 free cells, the centre included.
    assert len({tuple(p) for p in pos.tolist()}) == 96
    assert step.obs[:, 12].eq(10.0).all()


def test_reward_only_where_reached():
    env = make(batch_size=2)
    env.reset()
    place(env, [[5, 4], [5, 4]], [[5, 5], [1, 1]])
    step = env.step(torch.tensor([RIGHT, RIGHT]))
    assert step.reward.tolist() == [10.0, 0.0]
    assert env.position[1].tolist() == [5, 5]


def test_observation_contents():
    env = make(batch_size=2, episode_length=10)
    obs = env.reset()
    assert obs.shape == (2, OBS_SIZE)
    # Around the centre (6,6) every cell has an odd coordinate, hence is free.
    assert obs[:, :9].eq(0).all()
    assert obs[:, 9].eq(0).all() and obs[:, 10].eq(1).all()
    assert obs[:, 11].eq(0).all() and obs[:, 12].eq(0).all()
    assert obs[:, 13:].eq(0).all()
    place(env, [[1, 1], [6, 6]], [[11, 11], [11, 11]])
    step = env.step(torch.tensor([LEFT, DOWN]))
    obs = step.obs
    # Agent 0 at (1,1): rows 0..2, cols 0..2 -> top row and left column walls, (2,2) pillar.
    expected0 = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 1]], dtype=obs.dtype).flatten()
    # Agent 1 at (7,6): rows 6..8, cols 5..7 -> (8,6) is a pillar, (6,6) the free centre.
    expected1 = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=obs.dtype).flatten()
    assert torch.equal(obs[0, :9], expected0)
    assert torch.equal(obs[1, :9], expected1)
    assert obs[:, 11].tolist() == pytest.approx([0.1, 0.1])
    assert obs[0, 13:].tolist() == [0, 0, 1, 0] and obs[1, 13:].tolist() == [0, 1, 0, 0]
    assert obs[:, 9].eq(0).all() and obs[:, 10].eq(1).all()


def test_episode_length_and_done():
    env = make(batch_size=2, episode_length=3)
    env.reset()
    dones = [env.step(torch.zeros(2, dtype=torch.long)).done for _ in range(3)]
    assert dones == [False, False, True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, dtype=torch.long))


def test_batch_independence():
    """A maze's trajectory depends only on its own actions, not on the others in the batch."""
    torch.manual_seed(0)
    actions = torch.randint(NUM_ACTIONS, (50, 2))
    env = make(batch_size=2, seed=5)
    env.reset()
    place(env, [[6, 6], [6, 6]], [[1, 1], [1, 3]])
    ref = [env.step(actions[t]) for t in range(50)]
    other = actions.clone()
    other[:, 1] = (other[:, 1] + 1) % NUM_ACTIONS  # change only maze 1's actions
    env = make(batch_size=2, seed=5)
    env.reset()
    place(env, [[6, 6], [6, 6]], [[1, 1], [1, 3]])
    got = [env.step(other[t]) for t in range(50)]
    assert any(not torch.equal(a.obs[1], b.obs[1]) for a, b in zip(ref, got, strict=True))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.obs[0], b.obs[0])
        assert a.reward[0] == b.reward[0]


def test_step_validates_action():
    env = make(batch_size=2)
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="action values"):
        env.step(torch.tensor([0, 4]))
