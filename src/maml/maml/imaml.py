"""iMAML: meta-gradients through the optimum of a proximally regularised inner problem.

Update rule. For each task T the inner loop approximately solves

    phi_T(theta) = argmin_phi  L_T^support(phi) + lam / 2 * ||phi - theta||^2

with K steps of an inner optimizer started at theta (no graph is kept). At the optimum, the
implicit function theorem gives d phi / d theta = (I + H / lam)^{-1} with H the Hessian of
L_T^support at phi, so the meta-gradient of the query loss is

    g_T = (I + H / lam)^{-1} grad L_T^query(phi_T),

computed with a fixed number of conjugate-gradient steps on Hessian-vector products (the Hessian
is never formed). ``damping`` d solves ((1 + d) I + H / lam) g_T = grad L_T^query instead, which
keeps CG stable where H has negative curvature. The meta-optimizer steps theta along
mean_T g_T. Memory does not depend on K.

Reference:
    Rajeswaran, Finn, Kakade, Levine. Meta-Learning with Implicit Gradients. NeurIPS 2019.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

import metazoo
from maml import _vectorized
from maml._learner import (
    Criterion,
    MetaOptimizerFactory,
    ModelLearner,
    TaskGradients,
    build_meta_optimizer,
    check_bn_mode,
    check_criterion,
    check_inner_optimizer,
    check_module,
    check_optional_positive,
    check_tasks,
    evaluate_tasks,
    score_query,
    summarize,
)
from metazoo import Adapted, EvalResult, MetaStepResult, Task, check_steps

__all__ = ["conjugate_gradient", "iMAML"]


def _default_meta_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def conjugate_gradient(matvec: Callable[[list[Tensor]], list[Tensor]], b: Sequence[Tensor],
                       steps: int) -> list[Tensor]:
    """Solves ``A x = b`` for symmetric positive-definite ``A`` with ``steps`` CG iterations.

    Vectors are lists of tensors (one per parameter). Starts at ``x = 0``; runs exactly
    ``steps`` iterations without host synchronisation (a converged residual makes the remaining
    updates zero instead of dividing by zero).

    Args:
        matvec: ``v -> A v``.
        b: the right-hand side.
        steps: CG iterations; n iterations solve an n-dimensional system exactly (up to
            rounding).

    Returns:
        The approximate solution ``x``.
    """
    check_steps("steps", steps)
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap != 0, rs / torch.where(pap != 0, pap, 1.0), 0.0)
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * api for ri, api in zip(r, ap, strict=True)]
        rs_new = _dot(r, r)
        beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, 1.0), 0.0)
        p = [ri + beta * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x


class iMAML(ModelLearner):
    """Implicit MAML: conjugate-gradient meta-gradients of a proximal inner problem.

    Example:
        >>> learner = iMAML(model=net, criterion=F.cross_entropy, lam=2.0, cg_steps=5,
        ...                 inner_optimizer=metazoo.SGD(0.1), inner_steps=16)
        >>> result = learner.meta_step(tasks)
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: Criterion,
        lam: float = 1.0,
        cg_steps: int = 5,
        damping: float = 0.0,
        inner_optimizer: metazoo.InnerOptimizer | None = None,
        inner_steps: int = 10,
        eval_inner_steps: int | None = None,
        meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None = None,
        bn_mode: metazoo.BatchNormMode | str = metazoo.BatchNormMode.BATCH,
        inner_grad_clip: float | None = None,
        on_nonfinite: str = "raise",
        channels_last: bool = False,
        vectorize: bool | int | str = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        """Builds the learner.

        Args:
            model: the network; its parameters are the meta-learned initialisation theta.
            criterion: ``criterion(output, target) -> scalar loss``, a function or an
                ``nn.Module`` instance (``nn.MSELoss()``), for the support and query losses.
            lam: strength of the proximal term ``lam / 2 ||phi - theta||^2`` (> 0).
            cg_steps: conjugate-gradient iterations per task (>= 1).
            damping: added to the identity of the CG system (>= 0); 0 is the exact implicit
                gradient.
            inner_optimizer: a ``metazoo`` optimizer (default ``metazoo.SGD(0.01)``).
            inner_steps: inner steps during meta-training; the implicit gradient assumes they
                reach the optimum of the proximal problem.
            eval_inner_steps: inner steps in ``adapt``/``evaluate`` (default ``inner_steps``).
            meta_optimizer: a factory called with the meta-parameters, or a ``torch.optim``
                optimizer built over exactly them (default ``torch.optim.Adam(params,
                lr=1e-3)``); any other set of tensors is refused (``metazoo.build_meta_optimizer``).
            bn_mode: ``"batch"`` or ``"running"`` (see ``metazoo.BatchNormMode``).
            inner_grad_clip: clip the global norm of each inner gradient.
            on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming the
                task and inner step of the first NaN/inf loss; ``"skip"`` leaves such tasks out of
                the meta-gradient and the means and counts them in ``skipped_tasks``.
            channels_last: run adaptation, the query pass and the Hessian-vector products in
                channels-last memory format: every 4-D floating input (the first element of
                each support and query batch) and every 4-D parameter is copied to
                ``torch.channels_last`` for each task (the model is not modified). The same
                computation in another layout: results equal the default's up to rounding.
                On a CPU, 0.79x the default layout's time on 5-way 1-shot Omniglot tasks but
                1.06x with 20-image support batches (``docs/performance.md``).
            vectorize: run all tasks of a meta-batch as one batched computation
                (``metazoo.vectorize``: ``vmap`` over tasks of the proximal inner loop, with the
                inner gradients by ``torch.func.grad``, and of each task's implicit gradient,
                the same ``cg_steps`` conjugate-gradient iterations on Hessian-vector products by
                ``torch.func.vjp``, inside the map; the same results as the loop) in
                ``meta_backward`` and ``evaluate``: ``False`` (default) the per-task loop,
                ``True`` all tasks at once, an int N that many tasks at a time (memory bounded
                in the number of tasks), ``"auto"`` vectorized on CUDA and the loop elsewhere
                (on CPUs the loop was measured faster; ``benchmarks/gpu_meta_step.py``). Needs
                tasks of one shape; raises ``ValueError`` with ``channels_last``. Models must
                not draw random numbers (dropout) in the vectorized path.
            compile: compile the vectorized per-meta-batch function (``vmap`` over a chunk of
                tasks) with ``torch.compile`` (``fullgraph=True``: a graph break raises):
                ``False`` (default), ``True`` (inductor, ``dynamic=False``) or a dict of
                ``torch.compile`` keywords (``{"backend": "aot_eager"}``). Needs ``vectorize``.
                The first meta-step compiles (minutes with inductor; logged by the
                ``metazoo.vectorize`` logger); see ``docs/performance.md`` for where it pays.
        """
        self.model = check_module(model)
        self.criterion = check_criterion(criterion)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (
                0 < lam < math.inf):
            raise ValueError(f"lam must be a positive number (the proximal strength), got "
                             f"{lam!r}; use a finite value > 0")
        self.lam = float(lam)
        self.cg_steps = check_steps("cg_steps", cg_steps)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
                0 <= damping < math.inf):
            raise ValueError(f"damping must be a number >= 0, got {damping!r}; use a finite "
                             f"value")
        self.damping = float(damping)
        self.inner_optimizer = check_inner_optimizer(
            metazoo.SGD(0.01) if inner_optimizer is None else inner_optimizer)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.eval_inner_steps = check_steps(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.bn_mode = check_bn_mode(bn_mode)
        self.inner_grad_clip = check_optional_positive("inner_grad_clip", inner_grad_clip)
        self.on_nonfinite = metazoo.check_on_nonfinite(on_nonfinite)
        self.vectorize, self.channels_last = metazoo.vectorize.check_vectorize_and_layout(
            vectorize, channels_last)
        self.compile = metazoo.vectorize.check_compile(compile, self.vectorize)
        # requires_grad=False: neither adapted nor meta-learned (metazoo.trainable_parameters).
        self._trainable = set(metazoo.trainable_parameters(self.model))
        self.meta_optimizer = build_meta_optimizer(meta_optimizer, self.named_meta_parameters(),
                                                   _default_meta_optimizer)

    def _split(self) -> tuple[metazoo.Params, metazoo.Params]:
        """Detached ``(trainable, frozen)`` parameters in the learner's layout."""
        theta, static = metazoo.split_params(metazoo.params_of(self.model, detach=True),
                                             self._trainable.__contains__)
        if self.channels_last:
            theta = metazoo.params_to_channels_last(theta)
            static = metazoo.params_to_channels_last(static)
        return theta, static

    def _unroll(self, task: Task, steps: int, *, vectorized: bool = False
                ) -> tuple[metazoo.UnrollResult, metazoo.Params]:
        """Solves the proximal problem of ``task`` (already in the learner's layout); with
        ``vectorized`` by the ``torch.func`` unroll, to run inside ``vmap``.

        Returns the unroll (its ``params`` are the adapted, trainable ones) and the frozen
        parameters it used.
        """
        theta, static = self._split()
        support_loss = metazoo.make_loss_fn(self.model, self.criterion, bn_mode=self.bn_mode)
        lam = self.lam

        def proximal_loss(params: metazoo.Params, buffers: metazoo.Buffers,
                          batch: metazoo.Batch) -> tuple[Tensor, metazoo.Buffers]:
            loss, buffers = support_loss(params, buffers, batch)
            distance = sum(((params[n] - theta[n]) ** 2).sum() for n in theta)
            return loss + 0.5 * lam * distance, buffers

        unroll = metazoo.vectorize.functional_unroll if vectorized else metazoo.unroll
        with torch.no_grad():
            result = unroll(proximal_loss, dict(theta), self.inner_optimizer,
                                    list(task.support), steps=steps, static=static,
                                    buffers=metazoo.initial_buffers(self.model, self.bn_mode),
                                    inner_grad_clip=self.inner_grad_clip)
        return result, static

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Approximately solves the proximal inner problem of ``task`` (no meta-gradient)."""
        metazoo.check_task(task)
        steps = self.eval_inner_steps if steps is None else check_steps("steps", steps)
        result, static = self._unroll(self._layout(task), steps)
        return Adapted({**static, **result.params}, result.buffers,
                       tuple(result.losses.tolist()))

    def implicit_gradient(self, task: Task, phi: metazoo.Params, buffers: metazoo.Buffers
                          ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """The implicit meta-gradient of one task at the adapted parameters ``phi``.

        Args:
            task: the task; its support batches define the Hessian (mean loss over them), its
                query batch the outer loss.
            phi: adapted parameters (the inner solution); frozen parameters
                (``requires_grad=False``), if given, are ignored.
            buffers: the task's buffers after adaptation, used by the query pass.

        Returns:
            ``(meta_gradient, query_loss, query_accuracy)``, the gradient as one tensor per
            meta-parameter, in ``named_meta_parameters()`` order.
        """
        names = [n for n, _ in self.named_meta_parameters()]
        _, static = self._split()
        start_buffers = metazoo.initial_buffers(self.model, self.bn_mode)
        support_loss = metazoo.make_loss_fn(self.model, self.criterion, bn_mode=self.bn_mode)
        with torch.enable_grad():
            leaves = {n: phi[n].detach().requires_grad_() for n in names}
            inputs = list(leaves.values())
            full = {**static, **leaves}
            query_loss, acc = score_query(self.model, self.criterion, full, buffers,
                                          task.query, self.bn_mode)
            query_grad = torch.autograd.grad(query_loss, inputs, allow_unused=True,
                                             materialize_grads=True)
            # Only the support loss's Hessian enters CG: the proximal term's Hessian lam * I is
            # the identity part of the system.
            inner = torch.stack([support_loss(full, start_buffers, b)[0]
                                 for b in task.support]).sum()
            inner_grad = torch.autograd.grad(inner / len(task.support), inputs,
                                             create_graph=True, allow_unused=True,
                                             materialize_grads=True)

            # Entries of the gradient that do not depend on phi (a parameter the support loss
            # uses linearly or not at all) contribute nothing to Hessian-vector products.
            linked = [i for i, g in enumerate(inner_grad) if g.requires_grad]

            def matvec(v: list[Tensor]) -> list[Tensor]:
                hv = torch.autograd.grad([inner_grad[i] for i in linked], inputs,
                                         [v[i] for i in linked], retain_graph=True,
                                         allow_unused=True, materialize_grads=True
                                         ) if linked else [torch.zeros_like(t) for t in v]
                return [(1.0 + self.damping) * vi + hvi / self.lam
                        for vi, hvi in zip(v, hv, strict=True)]

            meta_grad = conjugate_gradient(matvec, [g.detach() for g in query_grad],
                                           self.cg_steps)
        return [g.detach() for g in meta_grad], query_loss.detach(), acc

    def _functional_implicit_gradient(self, task: Task, phi: metazoo.Params,
                                      buffers: metazoo.Buffers
                                      ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """``implicit_gradient`` by ``torch.func`` transforms, to run inside ``vmap``: the same
        query gradient, support-loss Hessian (mean over the support batches, from the initial
        buffers) and ``cg_steps`` iterations of ``conjugate_gradient``."""
        names = [n for n, _ in self.named_meta_parameters()]
        _, static = self._split()
        start_buffers = metazoo.initial_buffers(self.model, self.bn_mode)
        support_loss = metazoo.make_loss_fn(self.model, self.criterion, bn_mode=self.bn_mode)
        point = {n: phi[n].detach() for n in names}

        def query_loss(adapted: metazoo.Params) -> tuple[Tensor, tuple[Tensor, Tensor | None]]:
            loss, acc = score_query(self.model, self.criterion, {**static, **adapted}, buffers,
                                    task.query, self.bn_mode)
            return loss, (loss, acc)

        def mean_support_loss(adapted: metazoo.Params) -> Tensor:
            full = {**static, **adapted}
            inner = torch.stack([support_loss(full, start_buffers, b)[0]
                                 for b in task.support]).sum()
            return inner / len(task.support)

        query_grad, (loss, acc) = grad(query_loss, has_aux=True)(point)
        # The Hessian is symmetric: the vector-Jacobian product of the support gradient is H v,
        # as the loop's autograd.grad of the support gradient with grad_outputs v.
        _, hessian_vector = vjp(grad(mean_support_loss), point)  # type: ignore[misc]

        def matvec(v: list[Tensor]) -> list[Tensor]:
            (hv,) = hessian_vector(dict(zip(names, v, strict=True)))
            return [(1.0 + self.damping) * vi + hv[n] / self.lam
                    for n, vi in zip(names, v, strict=True)]

        meta_grad = conjugate_gradient(matvec, [query_grad[n] for n in names], self.cg_steps)
        return [g.detach() for g in meta_grad], loss.detach(), acc

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Accumulates the mean implicit meta-gradient over ``tasks`` into ``.grad``."""
        return self._deferred_meta_backward(tasks).read()

    def _deferred_meta_backward(self, tasks: Sequence[Task]
                                ) -> metazoo.DeferredRead[MetaStepResult]:
        tasks = check_tasks(tasks)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return _vectorized.imaml_meta_backward(self, tasks, chunk)
        start = time.perf_counter()
        collected = TaskGradients(self.meta_parameters(), len(tasks), self.on_nonfinite)
        per_task = []
        for task in tasks:
            task = self._layout(task)
            result, _ = self._unroll(task, self.inner_steps)
            # Computed for every task (a non-finite one is masked out of .grad on the device):
            # one host transfer checks the whole meta-batch.
            grads, loss, acc = self.implicit_gradient(task, result.params, result.buffers)
            collected.add(result.losses, loss, [g / len(tasks) for g in grads])
            per_task.append((loss, acc, result.losses))
        return collected.deferred_finish(per_task).then(
            lambda kept: summarize([per_task[i] for i in kept], len(tasks), collected.skipped,
                                   start, collected.means))

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task (proximal inner problem) and scores its query set."""
        tasks = check_tasks(tasks)
        steps = self.eval_inner_steps if steps is None else check_steps("steps", steps)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())

        def adapt(task: Task) -> tuple[metazoo.Params, metazoo.UnrollResult]:
            result, static = self._unroll(task, steps, vectorized=chunk is not None)
            return {**static, **result.params}, result

        if chunk is not None:
            return _vectorized.evaluate(self, tasks, chunk, adapt)
        return evaluate_tasks(tasks, adapt, self.model, self.criterion, self.bn_mode,
                              self._layout)
