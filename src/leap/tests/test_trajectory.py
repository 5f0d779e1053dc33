"""The Leap update rule against plain autograd, and the gradient bookkeeping helpers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from leap import Point, add_to_grad, flatten, segment_increment

torch.manual_seed(0)
A = torch.randn(4, 6, dtype=torch.float64)


def f(theta: Tensor) -> Tensor:
    """A smooth non-quadratic loss of a flat parameter vector."""
    return torch.tanh(A @ theta).pow(2).sum() + 0.1 * theta.dot(theta)


def point(theta: Tensor) -> Point:
    theta = theta.detach().requires_grad_()
    value = f(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return Point(theta.detach(), value.detach(), grad)


def autograd_increment(start: Point, end_params: Tensor, end_loss: Tensor, *, norm: bool,
                       loss: bool) -> Tensor:
    """Gradient of the segment's length (d1) or half squared length (d2) w.r.t. its start,
    holding the end point fixed: the quantity the Leap increment is derived from."""
    theta = start.params.clone().requires_grad_()
    squared = (end_params - theta).pow(2).sum()
    if loss:
        squared = squared + (end_loss - f(theta)) ** 2
    objective = squared.sqrt() if norm else 0.5 * squared
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def segment(descending: bool) -> tuple[Point, Point]:
    """Two points whose loss goes down (``descending``) or up along the segment."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    start = point(theta)
    end = point(theta - 0.3 * start.grad if descending else theta + 0.3 * start.grad)
    assert bool(end.loss < start.loss) == descending  # type: ignore[operator]
    return start, Point(end.params, end.loss)


@pytest.mark.parametrize("norm,loss,descending",
                         list(itertools.product([True, False], repeat=3)))
def test_increment_without_stabilizer_is_the_gradient_of_the_segment_length(norm, loss,
                                                                             descending):
    start, end = segment(descending)
    got = segment_increment(start, end, norm=norm, loss=loss, stabilizer=False)
    want = autograd_increment(start, end.params, end.loss, norm=norm, loss=loss)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", [True, False])
def test_stabilizer_mirrors_a_loss_increase_and_leaves_a_decrease_alone(norm):
    start, end = segment(descending=True)
    torch.testing.assert_close(segment_increment(start, end, norm=norm, stabilizer=True),
                               segment_increment(start, end, norm=norm, stabilizer=False),
                               rtol=0, atol=0)
    start, end = segment(descending=False)
    mirrored_end_loss = 2 * start.loss - end.loss  # type: ignore[operator]
    want = autograd_increment(start, end.params, mirrored_end_loss, norm=norm, loss=True)
    got = segment_increment(start, end, norm=norm, stabilizer=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got, segment_increment(start, end, norm=norm, stabilizer=False))


def test_zero_length_segment_adds_zero_not_nan():
    start = point(torch.ones(6, dtype=torch.float64))
    end = Point(start.params.clone(), start.loss.clone())  # type: ignore[union-attr]
    for loss in (True, False):
        got = segment_increment(start, end, norm=True, loss=loss)
        assert torch.equal(got, torch.zeros(6, dtype=torch.float64))


def test_loss_term_needs_losses_and_start_gradient():
    start = point(torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="loss=False"):
        segment_increment(Point(start.params), Point(start.params), loss=True)
    got = segment_increment(Point(start.params), Point(start.params * 2), loss=False, norm=False)
    torch.testing.assert_close(got, -start.params)


def test_flatten_copies_and_fills_missing_gradients_with_zeros():
    a, b = torch.ones(2, 2, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    flat = flatten([a, None], like=[a, b])
    assert torch.equal(flat, torch.tensor([1.0, 1, 1, 1, 0, 0, 0], dtype=torch.float64))
    flat.zero_()
    assert torch.equal(a, torch.ones(2, 2, dtype=torch.float64))  # a copy, not a view
    with pytest.raises(ValueError, match="like"):
        flatten([a, None])


def test_add_to_grad_creates_missing_gradients_adds_to_existing_and_applies_hook():
    p = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q.grad = torch.ones(3, dtype=torch.float64)
    flat = torch.arange(7, dtype=torch.float64)
    add_to_grad([p, q], flat)
    assert torch.equal(p.grad, torch.tensor([[0.0, 1], [2, 3]], dtype=torch.float64))
    assert torch.equal(q.grad, torch.tensor([5.0, 6, 7], dtype=torch.float64))
    add_to_grad([p, q], flat, hook=lambda piece: piece.mul_(-1))
    assert torch.equal(p.grad, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(q.grad, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="flatten"):
        add_to_grad([p, q], torch.zeros(6, dtype=torch.float64))
