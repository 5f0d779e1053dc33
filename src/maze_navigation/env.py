"""Grid maze of Miconi et al., vectorised over a batch of mazes in torch.

The maze (Miconi, Clune & Stanley, ICML 2018; Miconi et al., ICLR 2019) is an odd-sized square
grid whose border is wall and whose interior cells with both coordinates even are pillars; the
centre is always free. Every maze of a batch shares the layout; what differs between mazes is
the hidden reward cell, drawn afresh for each episode. The agent starts each episode at the
centre, moves up/down/left/right, stays in place (and pays ``wall_penalty``) when it bumps into a
wall, and on reaching the reward cell receives ``reward`` and is teleported to a uniformly random
free cell other than the reward cell. Because the reward cell is invisible, the agent must find
it by exploring and then return to it repeatedly within the episode: a task that has to be
learned anew in every episode.

Observation (17 numbers, ``OBS_SIZE``)::

    [0:9]   3x3 wall patch around the agent (row-major, 1 = wall)
    [9]     0
    [10]    bias, 1
    [11]    fraction of the episode elapsed, t / episode_length
    [12]    reward received on the previous step
    [13:17] one-hot previous action (all zero at the start of an episode)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACTIONS",
    "NUM_ACTIONS",
    "OBS_SIZE",
    "Maze",
    "MazeStep",
    "maze_layout",
]

ACTIONS = ("up", "down", "left", "right")
NUM_ACTIONS = len(ACTIONS)
OBS_SIZE = 17
# Row/column displacement of each action, in the order of ACTIONS.
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def maze_layout(size: int) -> Tensor:
    """Wall map of the maze.

    Args:
        size: side of the square grid; odd and at least 5.

    Returns:
        Bool tensor ``(size, size)``, True where there is a wall.

    Raises:
        ValueError: if ``size`` is even or smaller than 5.
    """
    if not isinstance(size, int) or size < 5 or size % 2 == 0:
        raise ValueError(
            f"size must be an odd integer >= 5 (a centre and a free ring around the pillars), "
            f"got {size!r}; pass e.g. size=13"
        )
    idx = torch.arange(size)
    border = (idx == 0) | (idx == size - 1)
    walls = border[:, None] | border[None, :]
    even = idx % 2 == 0
    walls |= even[:, None] & even[None, :]
    walls[size // 2, size // 2] = False
    return walls


@dataclass(frozen=True)
class MazeStep:
    """Result of one vectorised step.

    Attributes:
        obs: ``(batch, OBS_SIZE)`` observation after the step.
        reward: ``(batch,)`` reward received on this step.
        done: True when the episode has reached its length (same for every maze).
    """

    obs: Tensor
    reward: Tensor
    done: bool


class Maze:
    """A batch of independent mazes stepped together without Python loops over mazes.

    Args:
        batch_size: number of mazes.
        size: side of the grid (odd, >= 5).
        reward: reward for reaching the reward cell.
        wall_penalty: cost of bumping into a wall (subtracted from the reward).
        episode_length: steps per episode.
        generator: source of randomness for reward cells and teleports.
        dtype: floating dtype of observations and rewards.
        device: device of every tensor.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        size: int = 13,
        reward: float = 10.0,
        wall_penalty: float = 0.0,
        episode_length: int = 200,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(episode_length, int) or episode_length < 1:
            raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
        if wall_penalty < 0:
            raise ValueError(
                f"wall_penalty is a cost and must be >= 0, got {wall_penalty!r}; "
                "it is subtracted from the reward"
            )
        self.batch_size = batch_size
        self.size = size
        self.reward_value = float(reward)
        self.wall_penalty = float(wall_penalty)
        self.episode_length = episode_length
        self.generator = generator
        self.dtype = dtype
        self.device = torch.device(device)

        self.walls = maze_layout(size).to(self.device)
        free = (~self.walls).nonzero()
        self.free_cells = free  # (F, 2) row/column of every free cell, row-major order
        centre = size // 2
        self.centre = torch.tensor([centre, centre], device=self.device)
        not_centre = ~((free[:, 0] == centre) & (free[:, 1] == centre))
        self._reward_candidates = not_centre.nonzero().squeeze(1)  # indices into free_cells
        self._moves = torch.tensor(_MOVES, device=self.device)
        offsets = torch.arange(-1, 2, device=self.device)
        self._patch_rows = offsets.repeat_interleave(3)
        self._patch_cols = offsets.repeat(3)

        self.position = torch.zeros(batch_size, 2, dtype=torch.long, device=self.device)
        self.reward_index = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.t = 0
        self._prev_reward = torch.zeros(batch_size, dtype=dtype, device=self.device)
        self._prev_action = torch.full((batch_size,), -1, dtype=torch.long, device=self.device)

    @property
    def reward_cell(self) -> Tensor:
        """``(batch, 2)`` row/column of each maze's reward cell."""
        return self.free_cells[self.reward_index]

    def _randint(self, high: int) -> Tensor:
        return torch.randint(high, (self.batch_size,), generator=self.generator, device=self.device)

    def reset(self) -> Tensor:
        """Start a new episode in every maze: fresh reward cells, agents at the centre.

        Returns:
            ``(batch, OBS_SIZE)`` first observation.
        """
        pick = self._randint(len(self._reward_candidates))
        self.reward_index = self._reward_candidates[pick]
        self.position = self.centre.expand(self.batch_size, 2).clone()
        self.t = 0
        self._prev_reward = torch.zeros(self.batch_size, dtype=self.dtype, device=self.device)
        self._prev_action = torch.full((self.batch_size,), -1, dtype=torch.long, device=self.device)
        return self.observe()

    def observe(self) -> Tensor:
        """Current ``(batch, OBS_SIZE)`` observation (see the module docstring for the layout)."""
        rows = self.position[:, :1] + self._patch_rows
        cols = self.position[:, 1:] + self._patch_cols
        patch = self.walls[rows, cols].to(self.dtype)
        obs = torch.zeros(self.batch_size, OBS_SIZE, dtype=self.dtype, device=self.device)
        obs[:, :9] = patch
        obs[:, 10] = 1.0
        obs[:, 11] = self.t / self.episode_length
        obs[:, 12] = self._prev_reward
        acted = self._prev_action >= 0
        obs[acted, 13 + self._prev_action[acted]] = 1.0
        return obs

    def step(self, action: Tensor) -> MazeStep:
        """Move every agent by its action.

        Args:
            action: ``(batch,)`` integer actions in ``range(NUM_ACTIONS)``.

        Returns:
            The observation, reward and end-of-episode flag after the move.

        Raises:
            RuntimeError: if the episode is over (call ``reset``).
            ValueError: if ``action`` has the wrong shape or values out of range.
        """
        if self.t >= self.episode_length:
            raise RuntimeError(
                f"episode is over after {self.episode_length} steps; call reset() first"
            )
        if action.shape != (self.batch_size,):
            raise ValueError(
                f"action must have shape ({self.batch_size},), got {tuple(action.shape)}"
            )
        action = action.to(device=self.device, dtype=torch.long)
        if bool(((action < 0) | (action >= NUM_ACTIONS)).any()):
            raise ValueError(f"action values must lie in [0, {NUM_ACTIONS}), got {action}")

        target = self.position + self._moves[action]
        bumped = self.walls[target[:, 0], target[:, 1]]
        position = torch.where(bumped[:, None], self.position, target)
        found = (position == self.reward_cell).all(dim=1)
        reward = found.to(self.dtype) * self.reward_value - bumped.to(self.dtype) * (
            self.wall_penalty
        )

        # Teleport to a uniform free cell other than the reward cell: draw among F - 1 cells
        # and skip over the reward cell's index.
        draw = self._randint(len(self.free_cells) - 1)
        draw = draw + (draw >= self.reward_index).long()
        position = torch.where(found[:, None], self.free_cells[draw], position)

        self.position = position
        self.t += 1
        self._prev_reward = reward
        self._prev_action = action
        return MazeStep(obs=self.observe(), reward=reward, done=self.t >= self.episode_length)
