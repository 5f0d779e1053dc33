"""Advantage actor-critic training of maze agents, with warp parameters on a slower clock.

Every episode (one per maze of the batch, all stepped together) is a task: a new hidden reward
cell that the agent must discover and then exploit with its recurrent state. Per episode the
A2C loss (Mnih et al., 2016), summed over the steps and averaged over the mazes, is::

    R_t = r_t + gamma * R_{t+1}                        (R_T = 0; discounted return)
    A_t = R_t - v_t                                    (per-maze value baseline, v_t detached)
    L   = -sum_t log pi(a_t|s_t) A_t                   (policy gradient)
          + value_coef * sum_t (v_t - R_t)^2            (value regression)
          + concentration * sum_t sum_a pi(a|s_t)^2     (penalises concentrated policies)

The WarpGrad split (Flennerhag et al., ICLR 2020) comes from the ``warpgrad`` package: the agent
is wrapped in ``warpgrad.Warp(agent, agent.adapt_modules(), agent.warp_modules(),
warpgrad.ContinualUpdater(clip_norm=grad_clip))``, and two Adam optimizers run on two clocks:

* adaptable parameters (``warp.adapt_parameters()``): clipped (``grad_clip``) gradient step
  every episode (the task learner, plain ``torch.optim``);
* warp parameters (``warp.warp_parameters()``): ``warp.accumulate_warp_gradients()`` moves each
  episode's warp gradient into the updater's sum; every ``meta_update_ival`` episodes
  ``warp.backward(meta_step)`` writes the mean, clipped, and the meta-optimizer steps once.

During the first ``burn_in`` episodes only the adaptable parameters learn: ``warp.no_collect()``
makes the updater discard the warp gradients of those episodes, so the first warp update uses
only post-burn-in episodes. ``grad_clip=0`` turns clipping off for both groups (the reference
code parsed ``--gc`` but never clipped).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

import warpgrad
from agents import make_agent
from env import NUM_ACTIONS, Maze
from metazoo import NonFiniteError, checked_step
from metazoo.serialization import load_checked, save_checked

__all__ = [
    "A2CLoss",
    "ConfigError",
    "EpisodeResult",
    "NonFiniteEpisode",
    "Rollout",
    "TrainConfig",
    "Trainer",
    "a2c_loss",
    "config_from_dict",
    "discounted_returns",
    "last_fraction_mean",
    "load_checkpoint",
    "save_checkpoint",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (defaults follow the reference maze experiment).

    Attributes:
        agent: ``"warp"`` (warped recurrent network), ``"arnn"`` (the reference code's warped
            aRNN agent), ``"arnn_tied"`` (the same with the reference's tied sub-policy
            slices, ``agents.reference_chunk``) or ``"lstm"`` (plain LSTM baseline).
        seed: seed of parameter initialisation, mazes and action sampling.
        reward: reward for reaching the reward cell.
        wall_penalty: cost of bumping into a wall.
        concentration: coefficient of the policy concentration penalty ``sum pi^2``.
        value_coef: coefficient of the value loss.
        maze_size: side of the maze (odd).
        discount: discount factor gamma.
        grad_clip: maximum gradient norm, applied to each optimizer's parameter group
            (0: no clipping).
        episode_length: steps per episode.
        hidden_size: size of the recurrent cell (and of the adaptation LSTM).
        batch_size: mazes per episode.
        num_episodes: training episodes.
        learning_rate: Adam step size of the adaptable parameters (every episode).
        meta_learning_rate: Adam step size of the warp parameters.
        meta_update_ival: episodes between warp updates.
        burn_in: initial episodes during which warp parameters do not learn.
        random_episodes: episodes of a uniformly random policy measured as a baseline.
        dtype: ``"float32"`` or ``"float64"``.
    """

    agent: str = "warp"
    seed: int = 0
    reward: float = 10.0
    wall_penalty: float = 0.0
    concentration: float = 0.03
    value_coef: float = 0.1
    maze_size: int = 13
    discount: float = 0.9
    grad_clip: float = 4.0
    episode_length: int = 200
    hidden_size: int = 100
    batch_size: int = 16
    num_episodes: int = 1000
    learning_rate: float = 1e-3
    meta_learning_rate: float = 1e-3
    meta_update_ival: int = 30
    burn_in: int = 0
    random_episodes: int = 20
    dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = (
            "episode_length",
            "hidden_size",
            "batch_size",
            "meta_update_ival",
            "random_episodes",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(name, value, "a positive integer")
        for name in ("num_episodes", "burn_in"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(name, value, "a non-negative integer")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63 - 2:
            raise ConfigError("seed", self.seed, f"an integer from 0 to {2**63 - 3}")
        if not _is_int(self.maze_size) or self.maze_size < 5 or self.maze_size % 2 == 0:
            raise ConfigError("maze_size", self.maze_size, "an odd integer >= 5, e.g. 13")
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError("discount", self.discount, "[0, 1]", verb="lie in")
        for name in ("learning_rate", "meta_learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(name, value, "> 0 (and finite)")
            if value > MAX_ADAM_LR:
                # Adam moves every parameter by about lr per step whatever the gradient's
                # size: 1e30 replaces the network by noise of that size (a deterministic
                # policy at reward 0, or an overflow), never a run worth having.
                raise ConfigError(name, value, f"<= {MAX_ADAM_LR:g}: Adam moves every "
                                  f"parameter by about this much per step; e.g. 1e-3 (the "
                                  f"default)", verb="be")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ConfigError("grad_clip", self.grad_clip, ">= 0 (and finite; 0: no clipping)")
        for name in ("concentration", "value_coef", "wall_penalty"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(name, value, ">= 0 (and finite)")
        if not math.isfinite(self.reward):
            raise ConfigError("reward", self.reward, "a finite number")
        if self.dtype not in _DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {sorted(_DTYPES)}")
        peak, largest = _peak_return(self), float(torch.finfo(_DTYPES[self.dtype]).max)
        limit = (math.sqrt(largest / (self.value_coef * self.episode_length))
                 if self.value_coef > 0 else largest)
        if peak > min(limit, largest):
            # The value loss sums squared errors of returns up to ``peak``: it would overflow
            # to inf at the first rewarded episode, and every parameter would turn NaN.
            name = "reward" if abs(self.reward) >= self.wall_penalty else "wall_penalty"
            raise ConfigError(name, getattr(self, name), f"small enough for {self.dtype}: "
                              f"discounted returns reach {peak:.3g}, and their squared value "
                              f"error overflows {self.dtype} (largest {largest:.3g}); lower it "
                              f"(default {getattr(TrainConfig, name):g}) or use --dtype "
                              f"float64", verb="be")


#: The largest Adam step size a maze run accepts (``TrainConfig`` validation).
MAX_ADAM_LR = 1.0


def _peak_return(config: TrainConfig) -> float:
    """The largest discounted return an episode can have: every step rewarded (or penalised)."""
    c = config
    horizon = (c.episode_length if c.discount == 1.0
               else (1 - c.discount ** c.episode_length) / (1 - c.discount))
    return max(abs(c.reward), c.wall_penalty) * horizon


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class NonFiniteEpisode(NonFiniteError):
    """An episode whose loss, gradients or policy are NaN or infinite; nothing was updated.

    One line naming the episode, what was not finite and the options that lead there with
    their values; ``metazoo.cli.run_command`` prints it as one ``error:`` line (exit code 2).

    Attributes:
        episode: the episode (0-based).
        what: what was not finite.
        advice: the options to change, with their values, and the fix.
    """

    def __init__(self, *, episode: int, what: str, advice: str) -> None:
        self.episode, self.what, self.advice = episode, what, advice
        super().__init__(task=None, inner_step=None, where="episode")

    def _message(self) -> str:
        return (f"episode {self.episode}: {self.what}; nothing was updated and no checkpoint "
                f"was written. {self.advice}")


class ConfigError(ValueError):
    """An invalid ``TrainConfig`` value; ``field`` names it (the command line maps it to its
    flag)."""

    def __init__(self, field: str, value: Any, rule: str, *, verb: str = "be") -> None:
        self.field, self.value, self.requirement = field, value, f"must {verb} {rule}"
        super().__init__(f"{field} {self.requirement}, got {value!r}")


@dataclass(frozen=True)
class Rollout:
    """One episode of every maze, time-major.

    Attributes:
        log_probs: ``(T, batch)`` log-probability of each taken action.
        values: ``(T, batch)`` value estimates.
        probs: ``(T, batch, NUM_ACTIONS)`` action probabilities.
        rewards: ``(T, batch)`` rewards.
    """

    log_probs: Tensor
    values: Tensor
    probs: Tensor
    rewards: Tensor


@dataclass(frozen=True)
class A2CLoss:
    """The A2C loss and its terms (each summed over time and averaged over mazes)."""

    total: Tensor
    policy: Tensor
    value: Tensor
    concentration: Tensor


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of one training episode.

    Attributes:
        episode: index of the episode (0-based).
        mean_reward: total reward of the episode, averaged over mazes.
        loss: A2C loss value.
        adapt_grad_norm: norm of the adaptable gradient before clipping.
        meta_updated: whether the warp parameters were updated after this episode.
    """

    episode: int
    mean_reward: float
    loss: float
    adapt_grad_norm: float
    meta_updated: bool


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """``R_t = r_t + discount * R_{t+1}`` with ``R_T = 0``, along dim 0 of ``(T, batch)``."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + discount * running
        returns[t] = running
    return returns


def a2c_loss(
    rollout: Rollout, *, discount: float, value_coef: float, concentration: float
) -> A2CLoss:
    """Advantage actor-critic loss of a rollout (formula in the module docstring).

    Args:
        rollout: the episode.
        discount: gamma.
        value_coef: weight of the value loss.
        concentration: weight of the ``sum pi^2`` penalty.

    Returns:
        The total loss and its terms.
    """
    returns = discounted_returns(rollout.rewards, discount)
    advantage = returns - rollout.values.detach()
    batch = rollout.rewards.shape[1]
    policy = -(rollout.log_probs * advantage).sum() / batch
    value = value_coef * (rollout.values - returns).pow(2).sum() / batch
    conc = concentration * rollout.probs.pow(2).sum() / batch
    return A2CLoss(total=policy + value + conc, policy=policy, value=value, concentration=conc)


class Trainer:
    """A2C training of one agent on a batch of mazes.

    Args:
        config: hyperparameters.
        device: where the agent and mazes live.
    """

    def __init__(self, *, config: TrainConfig, device: torch.device | str = "cpu") -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(device)
        dtype = _DTYPES[config.dtype]
        # Seed the initialisation without touching the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            agent = make_agent(config.agent, hidden_size=config.hidden_size)
        self.agent: nn.Module = agent.to(device=self.device, dtype=dtype)
        self.env_generator = torch.Generator(self.device).manual_seed(config.seed + 1)
        self.action_generator = torch.Generator(self.device).manual_seed(config.seed + 2)
        self.env = self._make_env(self.env_generator)
        clip = config.grad_clip if config.grad_clip > 0 else None
        self.warp = warpgrad.Warp(
            self.agent,
            self.agent.adapt_modules(),
            self.agent.warp_modules(),
            warpgrad.ContinualUpdater(clip_norm=clip),
        )
        self.updater: warpgrad.ContinualUpdater = self.warp.updater
        self.adapt_params = list(self.warp.adapt_parameters())
        self.warp_params = list(self.warp.warp_parameters())
        self.adapt_optimizer = torch.optim.Adam(self.adapt_params, lr=config.learning_rate)
        self.warp_optimizer = (
            torch.optim.Adam(self.warp_params, lr=config.meta_learning_rate)
            if self.warp_params
            else None
        )
        self.episode = 0
        self.meta_updates = 0
        self.random_reward: float | None = None

    def _make_env(self, generator: torch.Generator) -> Maze:
        c = self.config
        return Maze(
            batch_size=c.batch_size,
            size=c.maze_size,
            reward=c.reward,
            wall_penalty=c.wall_penalty,
            episode_length=c.episode_length,
            generator=generator,
            dtype=_DTYPES[c.dtype],
            device=self.device,
        )

    def rollout(self) -> Rollout:
        """Play one episode in every maze with actions sampled from the agent's policy."""
        obs = self.env.reset()
        state = self.agent.initial_state(self.config.batch_size)
        log_probs, values, probs, rewards = [], [], [], []
        done = False
        while not done:
            out = self.agent(obs, state)
            state = out.state
            p = torch.softmax(out.logits, dim=1)
            try:
                action = torch.multinomial(p.detach(), 1, generator=self.action_generator)
            except RuntimeError as err:  # "probability tensor contains either inf, nan ..."
                if "probability tensor" not in str(err):
                    raise
                raise NonFiniteEpisode(
                    episode=self.episode, what=f"the policy's action probabilities are not "
                    f"finite at step {len(rewards)} of the rollout (the agent's parameters or "
                    f"state overflowed)", advice=self._advice()) from None
            log_probs.append(torch.log_softmax(out.logits, dim=1).gather(1, action).squeeze(1))
            values.append(out.value)
            probs.append(p)
            step = self.env.step(action.squeeze(1))
            rewards.append(step.reward)
            obs, done = step.obs, step.done
        return Rollout(
            log_probs=torch.stack(log_probs),
            values=torch.stack(values),
            probs=torch.stack(probs),
            rewards=torch.stack(rewards),
        )

    def measure_random_policy(self) -> float:
        """Mean episode reward of a uniformly random policy, on mazes of this run's size.

        Uses its own random streams (seeded from the config), so it does not change the
        training run. The result is stored in ``self.random_reward``.
        """
        c = self.config
        env_gen = torch.Generator(self.device).manual_seed(c.seed + 3)
        act_gen = torch.Generator(self.device).manual_seed(c.seed + 4)
        env = self._make_env(env_gen)
        total = 0.0
        for _ in range(c.random_episodes):
            env.reset()
            done = False
            while not done:
                action = torch.randint(
                    NUM_ACTIONS, (c.batch_size,), generator=act_gen, device=self.device
                )
                step = env.step(action)
                total += float(step.reward.sum())
                done = step.done
        self.random_reward = total / (c.random_episodes * c.batch_size)
        return self.random_reward

    def train_episode(self) -> EpisodeResult:
        """One episode: rollout, A2C loss, adaptable update, warp accumulation/update."""
        c = self.config
        rollout = self.rollout()
        loss = a2c_loss(
            rollout,
            discount=c.discount,
            value_coef=c.value_coef,
            concentration=c.concentration,
        )
        self.adapt_optimizer.zero_grad(set_to_none=True)
        for p in self.warp_params:
            p.grad = None
        loss.total.backward()

        # max_norm=inf measures the norm and leaves the gradients as they are.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.adapt_params, c.grad_clip or math.inf)
        # One host transfer (the result needs both numbers anyway): a non-finite loss or
        # gradient stops the run before any parameter, optimizer or warp sum takes it in.
        warp_grads = [p.grad for p in self.warp_params if p.grad is not None]
        # 0 * g is 0 where g is finite and NaN where it is not (faults.all_finite's trick).
        warp_fault = (torch.stack([(g * 0).sum() for g in warp_grads]).sum().to(grad_norm.dtype)
                      if warp_grads else grad_norm.new_zeros(()))
        loss_value, norm_value, warp_value = torch.stack(
            [loss.total.detach().to(grad_norm.dtype), grad_norm, warp_fault]).tolist()
        if not all(map(math.isfinite, (loss_value, norm_value, warp_value))):
            self.adapt_optimizer.zero_grad(set_to_none=True)
            for p in self.warp_params:
                p.grad = None
            raise NonFiniteEpisode(episode=self.episode, what=self._describe(loss, norm_value),
                                   advice=self._advice())
        self.adapt_optimizer.step()
        self.adapt_optimizer.zero_grad(set_to_none=True)

        meta_updated = False
        if self.warp_params:
            # Burn-in: the updater discards the warp gradients. Either way .grad is left None,
            # so nothing but the updater's sum carries them from one episode to the next.
            if self.episode >= c.burn_in:
                self.warp.collect()
            else:
                self.warp.no_collect()
            self.warp.accumulate_warp_gradients()
            if self.updater.count == c.meta_update_ival:
                try:
                    self.warp.backward(self._warp_step)
                except NonFiniteEpisode:
                    raise
                except NonFiniteError as err:  # the warp update itself (undone, sum dropped)
                    raise NonFiniteEpisode(
                        episode=self.episode, what=f"the warp update is not finite "
                        f"({err.where.replace('_', ' ')} of {list(err.names)[:3]})",
                        advice=self._advice()) from None
                self.meta_updates += 1
                meta_updated = True

        result = EpisodeResult(
            episode=self.episode,
            mean_reward=float(rollout.rewards.sum(0).mean()),
            loss=loss_value,
            adapt_grad_norm=norm_value,
            meta_updated=meta_updated,
        )
        self.episode += 1
        return result

    def _describe(self, loss: A2CLoss, grad_norm: float) -> str:
        """What was not finite in an episode (the error path only: one transfer per term)."""
        terms = {"policy": loss.policy, "value": loss.value, "concentration": loss.concentration}
        values = {name: float(term.detach()) for name, term in terms.items()}
        bad = [f"{name} {value:g}" for name, value in values.items() if not math.isfinite(value)]
        if bad:
            return f"the A2C loss is not finite ({', '.join(bad)})"
        if not math.isfinite(grad_norm):
            return f"the gradient of the A2C loss is not finite (norm {grad_norm:g})"
        return "the warp parameters' gradient of the A2C loss is not finite"

    def _advice(self) -> str:
        """The options that make an episode non-finite, with their values, and the fix."""
        c = self.config
        return (f"Lower --learning_rate ({c.learning_rate:g}) or --meta_learning_rate "
                f"({c.meta_learning_rate:g}) (defaults 1e-3), or --reward ({c.reward:g}), in "
                f"a new run folder")

    def _warp_step(self) -> None:
        """The meta-step ``warp.backward`` calls with the mean (clipped) warp gradient."""
        assert self.warp_optimizer is not None
        # Undone and reported if it makes a warp parameter or Adam's state non-finite.
        checked_step(self.warp_optimizer, self.warp.named_warp_parameters())
        self.warp_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: parameters, optimizers, accumulators, RNGs."""
        return {
            "config": asdict(self.config),
            "agent": self.agent.state_dict(),
            "adapt_optimizer": self.adapt_optimizer.state_dict(),
            "warp_optimizer": (
                self.warp_optimizer.state_dict() if self.warp_optimizer is not None else {}
            ),
            "warp_updater": self.updater.state_dict(),
            "episode": self.episode,
            "meta_updates": self.meta_updates,
            # Generator states are device-specific (the generators live on ``self.device``).
            "rng_device": self.device.type,
            "env_rng": self.env_generator.get_state(),
            "action_rng": self.action_generator.get_state(),
            "random_reward": self.random_reward,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the run's config must match the stored one.

        Raises:
            ValueError: if the stored config differs from this trainer's (other than
                ``num_episodes``, which a resumed run may extend).
        """
        stored = dict(state["config"])
        current = asdict(self.config)
        stored.pop("num_episodes", None)
        current.pop("num_episodes")
        diff = {k: (stored.get(k), v) for k, v in current.items() if stored.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint was written with a different config {diff} (stored, requested); "
                "resume with the same options or start a fresh run folder"
            )
        stored_device = state.get("rng_device", self.device.type)
        if stored_device != self.device.type:
            raise ValueError(
                f"checkpoint was written on {stored_device} and its random streams are "
                f"{stored_device} generator states, which cannot continue on "
                f"{self.device.type}; resume with --device {stored_device}"
            )
        self.agent.load_state_dict(state["agent"])
        self.adapt_optimizer.load_state_dict(state["adapt_optimizer"])
        if self.warp_optimizer is not None:
            self.warp_optimizer.load_state_dict(state["warp_optimizer"])
        self.updater.load_state_dict(state["warp_updater"])
        self.episode = int(state["episode"])
        self.meta_updates = int(state["meta_updates"])
        self.env_generator.set_state(state["env_rng"])
        self.action_generator.set_state(state["action_rng"])
        self.random_reward = state["random_reward"]


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a ``TrainConfig`` from a (stored) dict, ignoring unknown keys."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a state dict atomically (a temporary file in the same folder, then
    ``os.replace``) with a checksum of its content (``metazoo.serialization.save_checked``).

    A crash mid-write leaves the previous checkpoint intact.
    """
    save_checked(state, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        ValueError: if the file is damaged (it does not match its checksum, or cannot be read).
    """
    return load_checked(path)


def last_fraction_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of ``values`` (at least one element)."""
    if not values:
        raise ValueError("values is empty; train for at least one episode")
    count = max(1, math.ceil(len(values) * fraction))
    return sum(values[-count:]) / count
