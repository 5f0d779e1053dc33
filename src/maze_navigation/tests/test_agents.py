"""Tests of the warped recurrent agents and the LSTM baseline."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import agents as agents_module
import warpgrad
from agents import (
    MODULATIONS,
    LSTMAgent,
    ReferenceARNNAgent,
    WarpedRecurrentAgent,
    make_agent,
)
from env import NUM_ACTIONS, OBS_SIZE

HS = 5


def warped(seed=0, **kw):
    torch.manual_seed(seed)
    return WarpedRecurrentAgent(hidden_size=HS, warp_hidden_size=4, **kw).double()


def reference(seed=0):
    torch.manual_seed(seed)
    return ReferenceARNNAgent(hidden_size=HS).double()


def split(agent):
    """The agent's parameter groups as ``warpgrad.Warp`` (the trainer's wrapper) sees them."""
    warp = warpgrad.Warp(
        agent, agent.adapt_modules(), agent.warp_modules(), warpgrad.ContinualUpdater()
    )
    return {"adapt": list(warp.adapt_parameters()), "warp": list(warp.warp_parameters())}


def names_of(agent, params):
    ids = {id(p) for p in params}
    return {n for n, p in agent.named_parameters() if id(p) in ids}


def test_parameter_partition_warped():
    agent = warped()
    adapt = names_of(agent, split(agent)["adapt"])
    warp = names_of(agent, split(agent)["warp"])
    assert adapt == {
        "cell.input_weight.weight",
        "cell.recurrent_weight.weight",
        "cell.bias",
        "policy.weight",
        "policy.bias",
        "value.weight",
        "value.bias",
    }
    assert warp == {
        "warp_lstm.weight_ih",
        "warp_lstm.weight_hh",
        "warp_lstm.bias_ih",
        "warp_lstm.bias_hh",
        "warp_projection.weight",
        "warp_projection.bias",
    }
    assert agent.warp_projection.out_features == len(MODULATIONS) * HS


def test_parameter_partition_reference_arnn():
    """As the reference's WNet: adapt = aRNN cell + heads, meta = adaptation LSTM + projection."""
    agent = reference()
    assert names_of(agent, split(agent)["adapt"]) == {
        "cell.weight_ih", "cell.weight_hh", "cell.bias",
        "policy.weight", "policy.bias", "value.weight", "value.bias",
    }
    assert names_of(agent, split(agent)["warp"]) == {
        "warp_lstm.weight_ih", "warp_lstm.weight_hh", "warp_lstm.bias_ih", "warp_lstm.bias_hh",
        "warp_projection.weight",
    }
    # x and h scalings, then the W_ih, W_hh and bias scalings (the reference's chunk order)
    assert agent.warp_projection.out_features == OBS_SIZE + 4 * HS


def test_parameter_partition_lstm():
    agent = LSTMAgent(hidden_size=HS)
    assert split(agent)["warp"] == []
    assert names_of(agent, split(agent)["adapt"]) == {n for n, _ in agent.named_parameters()}


def test_reference_arnn_step_is_the_reference_formula():
    """One step equals the reference's ``arnn_cell`` formula written out by hand (alstm.arnn),
    with the policy ``tanh(P a)`` split into five independent slices [x, h, W_ih x, W_hh h, b]
    (as the reference's code intends; its ``chunk`` helper ties the last three, which this agent
    does not reproduce) and the adaptation LSTM reading ``[x, h]``."""
    agent = reference()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, OBS_SIZE, dtype=torch.float64, generator=gen)
    h, a, c = (torch.randn(3, HS, dtype=torch.float64, generator=gen) for _ in range(3))
    out = agent(x, (h, a, c))
    a1, c1 = torch.lstm_cell(
        torch.cat([x, h], 1), (a, c), agent.warp_lstm.weight_ih, agent.warp_lstm.weight_hh,
        agent.warp_lstm.bias_ih, agent.warp_lstm.bias_hh,
    )
    policy = torch.tanh(a1 @ agent.warp_projection.weight.T)
    p_x, p_h = policy[:, :OBS_SIZE], policy[:, OBS_SIZE:OBS_SIZE + HS]
    p_ih, p_hh, p_b = policy[:, OBS_SIZE + HS:].split(HS, dim=1)
    cell = agent.cell
    expected_h = torch.tanh(
        F.linear(x * p_x, cell.weight_ih) * p_ih + F.linear(h * p_h, cell.weight_hh) * p_hh
        + cell.bias * p_b
    )
    torch.testing.assert_close(out.state[0], expected_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state[1], a1, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state[2], c1, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, agent.policy(expected_h), rtol=0, atol=1e-12)


def tied(seed=0, hidden_size=20):
    torch.manual_seed(seed)
    return make_agent("arnn_tied", hidden_size=hidden_size).double()


def test_tied_arnn_step_is_the_reference_chunk_written_out():
    """``--agent arnn_tied``: one step equals ``alstm.arnn.arnn_cell`` with the policy sliced
    as the reference's ``alstm.utils.chunk`` slices it, ``policy.narrow(1, sizes[i], sizes[i+1])``
    over ``sizes = [0, 17, H, H, H, H, H]``, written out by hand for H = 20: p_x rows 0-16, p_h
    rows 17-36 and p_ih = p_hh = p_b rows 20-39 of the 117 projection rows."""
    agent = tied()
    assert agent.warp_projection.weight.shape == (OBS_SIZE + 5 * 20, 20)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, OBS_SIZE, dtype=torch.float64, generator=gen)
    h, a, c = (torch.randn(3, 20, dtype=torch.float64, generator=gen) for _ in range(3))
    out = agent(x, (h, a, c))
    a1, c1 = torch.lstm_cell(
        torch.cat([x, h], 1), (a, c), agent.warp_lstm.weight_ih, agent.warp_lstm.weight_hh,
        agent.warp_lstm.bias_ih, agent.warp_lstm.bias_hh,
    )
    policy = torch.tanh(a1 @ agent.warp_projection.weight.T)
    p_x, p_h, p_shared = policy[:, 0:17], policy[:, 17:37], policy[:, 20:40]
    cell = agent.cell
    expected_h = torch.tanh(
        F.linear(x * p_x, cell.weight_ih) * p_shared + F.linear(h * p_h, cell.weight_hh) * p_shared
        + cell.bias * p_shared
    )
    torch.testing.assert_close(out.state[0], expected_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state[1], a1, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state[2], c1, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, agent.policy(expected_h), rtol=0, atol=1e-12)
    # the five independent slices of the same projection give another step
    p_ih, p_hh, p_b = policy[:, 37:97].split(20, dim=1)
    untied_h = torch.tanh(F.linear(x * p_x, cell.weight_ih) * p_ih
                          + F.linear(h * p_h, cell.weight_hh) * p_hh + cell.bias * p_b)
    assert (out.state[0] - untied_h).abs().max() > 1e-3


def test_tied_arnn_reads_only_the_reference_rows():
    """At the reference's sizes (17 inputs, hidden 100) the projection has 517 rows and the
    tied cell reads rows 0-199 only: rows 200-516 get exactly zero gradient."""
    agent = tied(hidden_size=100)
    assert agent.warp_projection.weight.shape == (517, 100)
    x = torch.randn(4, OBS_SIZE, dtype=torch.float64)
    out = agent(x, agent.initial_state(4))
    out = agent(x, out.state)
    (out.logits.sum() + out.value.sum()).backward()
    grad = agent.warp_projection.weight.grad
    assert grad[200:].abs().sum() == 0
    assert (grad[:200].abs().sum(dim=1) > 0).all()


def test_reference_chunk_is_the_reference_helper():
    """``reference_chunk`` on a labelled row index: the reference's start/size pairs."""
    rows = torch.arange(517).unsqueeze(0)
    chunks = agents_module.reference_chunk(rows, [17, 100, 100, 100, 100, 100], dim=1)
    assert [(int(c[0, 0]), int(c[0, -1])) for c in chunks] == [
        (0, 16), (17, 116), (100, 199), (100, 199), (100, 199), (100, 199)]
    with pytest.raises(ValueError, match="do not match"):
        agents_module.reference_chunk(rows, [17, 100], dim=1)


def test_reference_arnn_initialisation():
    """Orthogonal W_ih, W_hh and a zero bias, as ``aRNNCell.reset_parameters``."""
    agent = ReferenceARNNAgent(hidden_size=32)
    w_ih, w_hh = agent.cell.weight_ih, agent.cell.weight_hh  # (32, 17): orthonormal columns
    torch.testing.assert_close(w_ih.T @ w_ih, torch.eye(OBS_SIZE), rtol=0, atol=1e-5)
    torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(32), rtol=0, atol=1e-5)
    assert agent.cell.bias.abs().sum() == 0


def test_each_modulation_reads_its_own_slice():
    """With a constant projection (zero weights) each term is scaled by its own slice."""
    agent = warped()
    scales = {"input": 0.5, "recurrent": 2.0, "preactivation": 1.5, "bias": -1.0}
    with torch.no_grad():
        agent.warp_projection.weight.zero_()
        agent.warp_projection.bias.copy_(
            torch.cat([torch.full((HS,), scales[m] - 1.0) for m in MODULATIONS]).double()
        )
    torch.manual_seed(1)
    x = torch.randn(3, OBS_SIZE, dtype=torch.float64)
    h0 = torch.randn(3, HS, dtype=torch.float64)
    state = (h0, *agent.initial_state(3)[1:])
    out = agent(x, state)
    expected = torch.tanh(
        scales["preactivation"]
        * (
            scales["input"] * x @ agent.cell.input_weight.weight.T
            + scales["recurrent"] * h0 @ agent.cell.recurrent_weight.weight.T
            + scales["bias"] * agent.cell.bias
        )
    )
    torch.testing.assert_close(out.state[0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits, agent.policy(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.value, agent.value(expected).squeeze(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", range(len(MODULATIONS)))
def test_modulation_depends_only_on_its_projection_rows(k):
    agent = warped()
    x = torch.randn(2, OBS_SIZE, dtype=torch.float64)
    state = agent.initial_state(2)
    mods = agent.modulations(x, *state)[:4]
    mods[k].sum().backward()
    grad = agent.warp_projection.weight.grad
    rows = torch.zeros(len(MODULATIONS) * HS, dtype=torch.bool)
    rows[k * HS : (k + 1) * HS] = True
    assert grad[rows].abs().sum() > 0
    assert grad[~rows].abs().sum() == 0


def test_initial_modulations_near_identity():
    agent = WarpedRecurrentAgent(hidden_size=32)
    x = torch.randn(4, OBS_SIZE)
    for m in agent.modulations(x, *agent.initial_state(4))[:4]:
        assert (m - 1).abs().max() < 0.2


def unroll_output(agent, params, steps=4):
    """Logits and values of a few steps, as a pure function of the parameters."""
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(steps, 2, OBS_SIZE, dtype=torch.float64, generator=gen)
    state = agent.initial_state(2)
    outs = []
    for t in range(steps):
        out = functional_call(agent, params, (xs[t], state))
        state = out.state
        outs += [out.logits, out.value]
    return torch.cat([o.reshape(-1) for o in outs])


@pytest.mark.parametrize(
    ("kind", "group"),
    [("warp", "adapt"), ("warp", "warp"), ("warp", "all"), ("arnn", "adapt"), ("arnn", "warp"),
     ("arnn_tied", "adapt"), ("arnn_tied", "warp"), ("lstm", "all")],
)
def test_gradients_through_time_match_finite_differences(kind, group):
    """Directional derivatives of a random readout of a 4-step unroll, float64 autograd
    against central differences, for the adaptable group, the warp group and everything."""
    agent = {"warp": warped, "arnn": reference, "arnn_tied": tied}.get(
        kind, lambda: LSTMAgent(hidden_size=HS).double()
    )()
    chosen = split(agent).get(group, list(agent.parameters()))
    names = names_of(agent, chosen)
    base = {n: p.detach().clone() for n, p in agent.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    readout = torch.randn(unroll_output(agent, base).shape, dtype=torch.float64, generator=gen)
    leaves = {n: t.clone().requires_grad_(n in names) for n, t in base.items()}
    (readout @ unroll_output(agent, leaves)).backward()
    for _ in range(3):
        direction = {
            n: torch.randn(base[n].shape, dtype=torch.float64, generator=gen) for n in names
        }
        analytic = sum((leaves[n].grad * direction[n]).sum() for n in names)
        eps = 1e-6

        def at(sign, direction=direction, eps=eps):
            shifted = {
                n: t + sign * eps * direction[n] if n in names else t for n, t in base.items()
            }
            return readout @ unroll_output(agent, shifted)

        numeric = (at(1) - at(-1)) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-8)
        assert abs(float(analytic)) > 1e-6


@pytest.mark.parametrize("make", [warped, reference, tied])
def test_warp_parameters_receive_gradient_through_recurrence(make):
    """The adaptation LSTM affects later steps: its gradient is non-zero at step 2's logits."""
    agent = make()
    x = torch.randn(2, OBS_SIZE, dtype=torch.float64)
    out = agent(x, agent.initial_state(2))
    out = agent(x, out.state)
    out.logits.sum().backward()
    for p in split(agent)["warp"]:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["warp", "arnn", "arnn_tied", "lstm"])
def test_output_shapes(name):
    agent = make_agent(name, hidden_size=HS)
    out = agent(torch.zeros(3, OBS_SIZE), agent.initial_state(3))
    assert out.logits.shape == (3, NUM_ACTIONS) and out.value.shape == (3,)


def test_validation():
    with pytest.raises(ValueError, match="agent"):
        make_agent("gru", hidden_size=4)
    with pytest.raises(ValueError, match="hidden_size"):
        WarpedRecurrentAgent(hidden_size=0)
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMAgent(hidden_size=-1)
