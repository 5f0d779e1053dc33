"""Recurrent actor-critic agents for the maze: the warped recurrent network and a plain LSTM.

Warped recurrent network (WarpGrad, Flennerhag et al., ICLR 2020, maze experiment). A
task-adaptable recurrent cell whose four terms are modulated multiplicatively by an adaptation
LSTM (the warp)::

    (a_t, c_t) = LSTM([x_t, h_{t-1}], (a_{t-1}, c_{t-1}))          warp
    [m_in, m_rec, m_pre, m_bias] = 1 + P a_t                         warp (P: projection)
    h_t = tanh(m_pre * (m_in * (W_x x_t) + m_rec * (W_h h_{t-1}) + m_bias * b))   adapted
    pi_t = softmax(W_pi h_t + b_pi),  v_t = w_v . h_t + b_v                        adapted

Each modulation reads its own ``hidden_size`` slice of the projection output, in the order
``MODULATIONS``. The cell (``W_x, W_h, b``) and the policy/value heads are the adaptable
parameters, updated every episode; the adaptation LSTM and ``P`` are the warp parameters,
updated every ``meta_update_ival`` episodes. ``P`` starts small so that every modulation starts
close to 1 (the warp starts near the identity).

``ReferenceARNNAgent`` (``"arnn"``) is the reference code's warped agent (the aRNN of the
``alstm`` package): the same split, with ``tanh`` sub-policies that also scale the cell's inputs,
see its docstring. ``"arnn_tied"`` is the same agent with the sub-policies sliced as the
reference's code runs them (``reference_chunk``: three of them are one slice).

Each agent names its parameter split as modules (``adapt_modules()``, ``warp_modules()``), which
the trainer hands to ``warpgrad.Warp``.

Plain LSTM agent (learning to reinforcement learn, Wang et al. 2016; Duan et al. 2016): an
``LSTMCell`` with the same heads; all of its parameters are adaptable and it has no warp
parameters.

All agents take the observation ``x_t`` (17 numbers, see ``env``) and a recurrent state, and
return an ``AgentOutput`` with action logits, the value estimate and the next state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from env import NUM_ACTIONS, OBS_SIZE

__all__ = [
    "AGENTS",
    "MODULATIONS",
    "ARNNCell",
    "AgentOutput",
    "LSTMAgent",
    "ModulatedCell",
    "ReferenceARNNAgent",
    "WarpedRecurrentAgent",
    "make_agent",
    "reference_chunk",
]

MODULATIONS = ("input", "recurrent", "preactivation", "bias")


@dataclass(frozen=True)
class AgentOutput:
    """One step of an agent.

    Attributes:
        logits: ``(batch, NUM_ACTIONS)`` unnormalised action log-probabilities.
        value: ``(batch,)`` value estimate of the current state.
        state: recurrent state to pass to the next step.
    """

    logits: Tensor
    value: Tensor
    state: tuple[Tensor, ...]


def _check_sizes(input_size: int, hidden_size: int) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ModulatedCell(nn.Module):
    """The adaptable recurrent cell of ``WarpedRecurrentAgent``: ``W_x``, ``W_h`` and ``b``."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_weight = nn.Linear(input_size, hidden_size, bias=False)
        self.recurrent_weight = nn.Linear(hidden_size, hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: Tensor, h: Tensor, m_input: Tensor, m_rec: Tensor, m_pre: Tensor,
                m_bias: Tensor) -> Tensor:
        pre = m_input * self.input_weight(x) + m_rec * self.recurrent_weight(h) + m_bias * self.bias
        return torch.tanh(m_pre * pre)


class _WarpedSplit(nn.Module):
    """The WarpGrad split shared by the warped agents: their recurrent ``cell`` and the
    ``policy``/``value`` heads are adapted every episode; the adaptation ``warp_lstm`` and its
    ``warp_projection`` are the warp (meta) layers."""

    cell: nn.Module
    policy: nn.Module
    value: nn.Module
    warp_lstm: nn.Module
    warp_projection: nn.Module

    def adapt_modules(self) -> list[nn.Module]:
        """Adapted every episode: the recurrent cell and the policy/value heads."""
        return [self.cell, self.policy, self.value]

    def warp_modules(self) -> list[nn.Module]:
        """Warp (meta) layers: the adaptation LSTM and its projection."""
        return [self.warp_lstm, self.warp_projection]


class WarpedRecurrentAgent(_WarpedSplit):
    """Recurrent cell modulated by an adaptation LSTM, with policy and value heads.

    Args:
        input_size: observation size.
        hidden_size: size of the adaptable recurrent cell.
        warp_hidden_size: size of the adaptation LSTM (defaults to ``hidden_size``).
        num_actions: number of actions.
        warp_init_scale: scale of the projection's initial weights; small keeps the initial
            modulations near 1.
    """

    def __init__(
        self,
        *,
        input_size: int = OBS_SIZE,
        hidden_size: int = 100,
        warp_hidden_size: int | None = None,
        num_actions: int = NUM_ACTIONS,
        warp_init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        warp_hidden_size = hidden_size if warp_hidden_size is None else warp_hidden_size
        _check_sizes(input_size, hidden_size)
        _check_sizes(input_size, warp_hidden_size)
        if warp_init_scale < 0:
            raise ValueError(f"warp_init_scale must be >= 0, got {warp_init_scale!r}")
        self.hidden_size = hidden_size
        self.warp_hidden_size = warp_hidden_size
        # Adaptable: the recurrent cell and the heads.
        self.cell = ModulatedCell(input_size, hidden_size)
        self.policy = nn.Linear(hidden_size, num_actions)
        self.value = nn.Linear(hidden_size, 1)
        # Warp: the adaptation LSTM and its projection onto the four modulations.
        self.warp_lstm = nn.LSTMCell(input_size + hidden_size, warp_hidden_size)
        self.warp_projection = nn.Linear(warp_hidden_size, len(MODULATIONS) * hidden_size)
        with torch.no_grad():
            self.warp_projection.weight.mul_(warp_init_scale)
            self.warp_projection.bias.mul_(warp_init_scale)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zero state ``(h, a, c)``: cell hidden, adaptation LSTM hidden and memory."""
        ref = self.cell.bias
        return (
            ref.new_zeros(batch_size, self.hidden_size),
            ref.new_zeros(batch_size, self.warp_hidden_size),
            ref.new_zeros(batch_size, self.warp_hidden_size),
        )

    def modulations(self, x: Tensor, h: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        """Advance the adaptation LSTM and return ``(m_input, m_recurrent, m_pre, m_bias, a, c)``.

        Each modulation is ``1 + `` its own consecutive ``hidden_size`` slice of the projection.
        """
        a, c = self.warp_lstm(torch.cat([x, h], dim=1), (a, c))
        m = 1.0 + self.warp_projection(a)
        m_input, m_rec, m_pre, m_bias = m.split(self.hidden_size, dim=1)
        return m_input, m_rec, m_pre, m_bias, a, c

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> AgentOutput:
        """One step from observation ``x`` ``(batch, input_size)`` and state ``(h, a, c)``."""
        h, a, c = state
        m_input, m_rec, m_pre, m_bias, a, c = self.modulations(x, h, a, c)
        h = self.cell(x, h, m_input, m_rec, m_pre, m_bias)
        return AgentOutput(logits=self.policy(h), value=self.value(h).squeeze(1), state=(h, a, c))


class ARNNCell(nn.Module):
    """The adaptable cell of the reference's aRNN (``alstm.arnn.aRNNCell``): ``W_ih``, ``W_hh``
    (orthogonal initialisation) and ``b`` (zeros)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        nn.init.orthogonal_(self.weight_ih)
        nn.init.orthogonal_(self.weight_hh)

    def forward(self, x: Tensor, h: Tensor, policy: tuple[Tensor, ...]) -> Tensor:
        p_x, p_h, p_ih, p_hh, p_b = policy
        gates = (
            F.linear(x * p_x, self.weight_ih) * p_ih
            + F.linear(h * p_h, self.weight_hh) * p_hh
            + self.bias * p_b
        )
        return torch.tanh(gates)


def reference_chunk(tensor: Tensor, sizes: list[int], dim: int) -> list[Tensor]:
    """``alstm.utils.chunk`` as the reference runs it: chunk ``i`` is
    ``tensor.narrow(dim, sizes[i - 1], sizes[i])`` (``0`` for the first), i.e. the previous
    chunk's *size* is used as the next chunk's *start*, not the running sum of sizes.

    With ``sizes = [17, 100, 100, 100, 100, 100]`` the chunks are rows 0-16, 17-116, 100-199,
    100-199, 100-199, 100-199: from the third on they are one and the same slice, the second
    overlaps it, and rows 200-516 are never read. The reference checks, as here, that the sizes
    add up to the tensor's size.
    """
    if tensor.size(dim) != sum(sizes):
        raise ValueError(f"chunk sizes {sizes} (sum {sum(sizes)}) do not match the tensor's "
                         f"size {tensor.size(dim)} in dim {dim}")
    starts = [0, *sizes[:-1]]
    return [tensor.narrow(dim, start, size) for start, size in zip(starts, sizes)]


class ReferenceARNNAgent(_WarpedSplit):
    """The reference's warped agent (flennerhag/warpgrad ``maze_navigation/run.py`` ``WNet``,
    one-layer ``alstm.aRNN``), written out here because its ``alstm`` package does not run on
    current PyTorch.

    ::

        (a_t, c_t) = LSTM([x_t, h_{t-1}], (a_{t-1}, c_{t-1}))                  warp
        [p_x, p_h, p_ih, p_hh, p_b] = tanh(P a_t)          (P: no bias)         warp
        h_t = tanh((W_ih (p_x * x_t)) * p_ih + (W_hh (p_h * h_{t-1})) * p_hh + b * p_b)  adapted

    Unlike ``WarpedRecurrentAgent``: the sub-policies are ``tanh(P a)`` (in (-1, 1), near 0 at
    initialisation, not near 1), they also scale the cell's inputs ``x`` and ``h`` before the
    weights, there is no pre-activation modulation and ``W_ih``, ``W_hh`` start orthogonal.

    This is the cell as the reference's code writes it, with five independent sub-policies. As
    the reference *runs* it they are not independent: its ``alstm.utils.chunk`` passes the
    previous chunk's size as the next chunk's start to ``narrow``, so ``p_ih``, ``p_hh`` and
    ``p_b`` are one and the same slice and ``p_h`` overlaps it (``docs/experiments/maze.md``,
    "What differs from the reference"). ``tied=True`` (``--agent arnn_tied``) runs it that way. The
    reference's projection also has one more ``hidden_size`` output that its cell never reads;
    the untied agent leaves it out, which only shifts the random initialisation, the tied one
    keeps it (``input_size + 5 * hidden_size`` outputs, 517 at the defaults), as the reference.

    Args:
        input_size: observation size.
        hidden_size: size of the adaptable cell and of the adaptation LSTM.
        num_actions: number of actions.
        tied: slice the sub-policies as the reference's ``chunk`` does (``reference_chunk``):
            ``p_x`` rows 0 to ``input_size - 1``, ``p_h`` the next ``hidden_size`` rows, and
            ``p_ih = p_hh = p_b`` all rows ``hidden_size`` to ``2 * hidden_size - 1``.
    """

    def __init__(
        self, *, input_size: int = OBS_SIZE, hidden_size: int = 100, num_actions: int = NUM_ACTIONS,
        tied: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.hidden_size = hidden_size
        self.tied = tied
        self.policy_sizes = (input_size, hidden_size, hidden_size, hidden_size, hidden_size)
        # the reference's chunk sizes: one more hidden_size chunk, which the cell never reads
        self.chunk_sizes = [*self.policy_sizes, hidden_size]
        projection_size = sum(self.chunk_sizes) if tied else sum(self.policy_sizes)
        self.warp_lstm = nn.LSTMCell(input_size + hidden_size, hidden_size)
        self.warp_projection = nn.Linear(hidden_size, projection_size, bias=False)
        self.cell = ARNNCell(input_size, hidden_size)
        self.policy = nn.Linear(hidden_size, num_actions)
        self.value = nn.Linear(hidden_size, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zero state ``(h, a, c)``: cell hidden, adaptation LSTM hidden and memory."""
        ref = self.cell.bias
        return tuple(ref.new_zeros(batch_size, self.hidden_size) for _ in range(3))

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> AgentOutput:
        """One step from observation ``x`` ``(batch, input_size)`` and state ``(h, a, c)``."""
        h, a, c = state
        a, c = self.warp_lstm(torch.cat([x, h], dim=1), (a, c))
        projected = torch.tanh(self.warp_projection(a))
        if self.tied:
            policy = tuple(reference_chunk(projected, self.chunk_sizes, dim=1)[:5])
        else:
            policy = projected.split(self.policy_sizes, dim=1)
        h = self.cell(x, h, policy)
        return AgentOutput(logits=self.policy(h), value=self.value(h).squeeze(1), state=(h, a, c))


class LSTMAgent(nn.Module):
    """Plain LSTM actor-critic (learning to reinforcement learn); no warp parameters.

    Args:
        input_size: observation size.
        hidden_size: LSTM size.
        num_actions: number of actions.
    """

    def __init__(
        self, *, input_size: int = OBS_SIZE, hidden_size: int = 100, num_actions: int = NUM_ACTIONS
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.hidden_size = hidden_size
        self.lstm = nn.LSTMCell(input_size, hidden_size)
        self.policy = nn.Linear(hidden_size, num_actions)
        self.value = nn.Linear(hidden_size, 1)

    def adapt_modules(self) -> list[nn.Module]:
        """Every layer: the LSTM and the heads are all trained every episode."""
        return [self.lstm, self.policy, self.value]

    def warp_modules(self) -> list[nn.Module]:
        """No warp layers: the baseline has nothing meta-learned at a slower rate."""
        return []

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Zero ``(h, c)``."""
        ref = self.policy.weight
        return (
            ref.new_zeros(batch_size, self.hidden_size),
            ref.new_zeros(batch_size, self.hidden_size),
        )

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> AgentOutput:
        """One step from observation ``x`` ``(batch, input_size)`` and state ``(h, c)``."""
        h, c = self.lstm(x, state)
        return AgentOutput(logits=self.policy(h), value=self.value(h).squeeze(1), state=(h, c))


AGENTS: dict[str, Callable[..., nn.Module]] = {
    "warp": WarpedRecurrentAgent,
    "arnn": ReferenceARNNAgent,
    "arnn_tied": partial(ReferenceARNNAgent, tied=True),
    "lstm": LSTMAgent,
}


def make_agent(name: str, *, hidden_size: int) -> nn.Module:
    """Build an agent by name (``"warp"``, ``"arnn"``, ``"arnn_tied"`` or ``"lstm"``).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in AGENTS:
        raise ValueError(f"agent must be one of {sorted(AGENTS)}, got {name!r}")
    return AGENTS[name](hidden_size=hidden_size)
