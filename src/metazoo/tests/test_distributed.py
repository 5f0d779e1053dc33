"""Distributed meta-training: 2 gloo processes on loopback against one process, and failures.

The multi-process tests fork one process per rank with ``torch.multiprocessing``; each sets the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT)
and calls ``distributed.setup`` as it would under torchrun.
The algorithm packages (maml, leap, warpgrad) are test-only dependencies here: the core itself
never imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import metazoo
from leap import LeapLearner
from maml import MAML, Reptile
from metazoo import Task, distributed
from metazoo.testing import WarpedMLP, small_mlp
from warpgrad import DualUpdater, OptimizerParameters, Warp, WarpGrad

STEPS = 2  # meta-steps per case, so that meta-optimizer state carries over once
LAUNCH_LIMIT = 60.0  # seconds a whole 2-process launch may take before the test fails
FAIL_TIMEOUT = 3.0  # process-group timeout in the failure tests


# -- models, learners and tasks, built identically by the test and by every rank ----------------


def _sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def _maml_adam() -> metazoo.MetaLearner:
    return MAML(model=small_mlp(batch_norm=True), criterion=F.cross_entropy,
                inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=2,
                learn_inner_lr="per_tensor",
                meta_optimizer=lambda params: torch.optim.Adam(params, lr=0.01))


def _maml_sgd() -> metazoo.MetaLearner:
    return MAML(model=small_mlp(), criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
                inner_steps=2, meta_optimizer=_sgd(0.5))


def _reptile() -> metazoo.MetaLearner:
    return Reptile(model=small_mlp(), criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.2),
                   inner_steps=3, meta_optimizer=_sgd(0.5))


def _leap() -> metazoo.MetaLearner:
    return LeapLearner(model=small_mlp(), criterion=F.cross_entropy,
                       inner_optimizer=metazoo.SGD(0.2), inner_steps=3, meta_optimizer=_sgd(0.5))


def _warpgrad() -> metazoo.MetaLearner:
    model = WarpedMLP(batch_norm=False).double()
    warp = Warp(model, [model.fc1, model.fc2, model.head], [model.warp1, model.warp2],
                DualUpdater(F.cross_entropy),
                optimizer_parameters=OptimizerParameters(trainable=True, default_lr=0.3,
                                                         default_momentum=0.5))
    return WarpGrad(warp, inner_steps=3, meta_optimizer=_sgd(0.5))


# name -> (learner factory, tasks per meta-batch, whether rank 0 warms the meta-optimizer up
# before the broadcast, so that its state must be copied to rank 1)
CASES: dict[str, tuple[Callable[[], metazoo.MetaLearner], int, bool]] = {
    "maml": (_maml_adam, 4, True),
    "maml_uneven": (_maml_sgd, 3, False),
    "reptile": (_reptile, 4, False),
    "reptile_empty_rank": (_reptile, 1, False),
    "leap": (_leap, 4, False),
    "warpgrad": (_warpgrad, 4, False),
}


def _build(case: str, seed: int) -> metazoo.MetaLearner:
    torch.manual_seed(seed)
    return CASES[case][0]()


def _task(seed: int) -> Task:
    # One support batch per task: WarpGrad's replay pairs stored states with support batches
    # in its (random) replay order, which then cannot change the result.
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=g))

    return Task([batch(6)], batch(5))


def _meta_batch(step: int, size: int) -> list[Task]:
    return [_task(1000 * step + i) for i in range(size)]


def _results(result: metazoo.MetaStepResult) -> tuple:
    return dataclasses.astuple(dataclasses.replace(result, seconds=0.0))


def _snapshot(learner: metazoo.MetaLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.named_meta_parameters()}


def _single_process(case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list,
                                        metazoo.EvalResult]:
    """(initial, final meta-parameters, step results, evaluation) of a single-process run."""
    _, size, warm_up = CASES[case]
    learner = _build(case, seed=0)
    if warm_up:
        learner.meta_step([_task(-1)])
    initial = _snapshot(learner)
    results = [_results(learner.meta_step(_meta_batch(s, size))) for s in range(STEPS)]
    return initial, _snapshot(learner), results, learner.evaluate(_meta_batch(STEPS, size))


# -- the worker: one rank --------------------------------------------------------------------


@contextlib.contextmanager
def _counting_all_reduces() -> Iterator[list[int]]:
    """Records the size of every ``dist.all_reduce`` (in a forked child, which owns its torch)."""
    calls: list[int] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original


def _worker_equal(out: Path, ctx: distributed.DistributedContext) -> None:
    for case, (_, size, warm_up) in CASES.items():
        # Rank 1 starts from other parameters (and no meta-optimizer state): the broadcast
        # must make it identical to rank 0.
        learner = _build(case, seed=ctx.rank)
        if warm_up and ctx.rank == 0:
            learner.meta_step([_task(-1)])
        distributed.broadcast_learner(learner)
        distributed.check_synchronized(learner)
        results = []
        with _counting_all_reduces() as calls:
            for s in range(STEPS):
                local = distributed.shard(_meta_batch(s, size))
                results.append(_results(distributed.meta_step(learner, local)))
        distributed.check_synchronized(learner)
        evaluation = distributed.evaluate(learner, distributed.shard(_meta_batch(STEPS, size)))
        torch.save({"params": _snapshot(learner), "results": results, "all_reduce": calls,
                    "evaluation": dataclasses.asdict(evaluation)}, out / f"{case}-{ctx.rank}.pt")
    # A desynchronised rank must be reported on every rank.
    learner = _build("maml_uneven", seed=0)
    if ctx.rank == 1:
        with torch.no_grad():
            learner.model[2].bias.add_(1e-12)
    try:
        distributed.check_synchronized(learner)
        message = ""
    except RuntimeError as error:
        message = str(error)
    (out / f"desync-{ctx.rank}.txt").write_text(message)


def _worker_nonfinite(out: Path, ctx: distributed.DistributedContext) -> None:
    """Rank 1's second task has a NaN input (on_nonfinite="raise"): every rank must raise at
    once, leave the meta-parameters alone, and the next meta-step must still work."""
    learner = _build("maml_uneven", seed=0)
    before = _snapshot(learner)
    tasks = distributed.shard(_meta_batch(0, 4))  # rank 0: tasks 0, 1; rank 1: tasks 2, 3
    if ctx.rank == 1:
        (x, y), = tasks[1].support
        tasks[1] = Task([(torch.full_like(x, float("nan")), y)], tasks[1].query)
    started = time.monotonic()
    try:
        distributed.meta_step(learner, tasks)
        error: dict[str, Any] = {}
    except metazoo.NonFiniteError as caught:
        error = {"where": caught.where, "task": caught.task, "message": str(caught)}
    seconds = time.monotonic() - started
    unchanged = all(torch.equal(before[n], p) for n, p in learner.named_meta_parameters())
    no_grads = all(p.grad is None for _, p in learner.named_meta_parameters())
    result = distributed.meta_step(learner, distributed.shard(_meta_batch(1, 4)))
    distributed.check_synchronized(learner)
    torch.save({"error": error, "seconds": seconds, "unchanged": unchanged,
                "no_grads": no_grads, "next": _results(result)},
               out / f"nonfinite-{ctx.rank}.pt")


# -- on_nonfinite="skip": the distributed step equals one process's on the same tasks ------------


def _skipping(case: str) -> metazoo.MetaLearner:
    """A learner of ``case`` built with on_nonfinite="skip" (seed 0 on every rank)."""
    torch.manual_seed(0)
    if case == "maml":
        return MAML(model=small_mlp(batch_norm=True), criterion=F.cross_entropy,
                    inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=2,
                    meta_optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
                    on_nonfinite="skip")
    if case == "reptile":
        return Reptile(model=small_mlp(), criterion=F.cross_entropy,
                       inner_optimizer=metazoo.SGD(0.2), inner_steps=3,
                       meta_optimizer=_sgd(0.5), on_nonfinite="skip")
    if case == "leap":
        return LeapLearner(model=small_mlp(), criterion=F.cross_entropy,
                           inner_optimizer=metazoo.SGD(0.2), inner_steps=3,
                           meta_optimizer=_sgd(0.5), on_nonfinite="skip")
    model = WarpedMLP(batch_norm=False).double()
    warp = Warp(model, [model.fc1, model.fc2, model.head], [model.warp1, model.warp2],
                DualUpdater(F.cross_entropy),
                optimizer_parameters=OptimizerParameters(trainable=True, default_lr=0.3,
                                                         default_momentum=0.5))
    return WarpGrad(warp, inner_steps=3, meta_optimizer=_sgd(0.5), on_nonfinite="skip")


SKIP_CASES = ("maml", "reptile", "leap", "warpgrad")
# Meta-batches of 5 tasks (rank 0 adapts tasks 0-2, rank 1 tasks 3-4) and the tasks whose
# support batch is NaN: one task on rank 1; every task of rank 1 (it joins with no gradient);
# nothing (the meta-optimizer state carries over); every task of the meta-batch.
SKIP_STEPS: tuple[tuple[int, ...], ...] = ((4,), (3, 4), (), (0, 1, 2, 3, 4))


def _poisoned_batch(step: int, bad: tuple[int, ...]) -> list[Task]:
    tasks = _meta_batch(step, 5)
    for i in bad:
        (x, y), = tasks[i].support
        tasks[i] = Task([(torch.full_like(x, float("nan")), y)], tasks[i].query)
    return tasks


def _worker_skip(out: Path, ctx: distributed.DistributedContext) -> None:
    for case in SKIP_CASES:
        learner = _skipping(case)
        results = [_results(distributed.meta_step(learner, distributed.shard(
            _poisoned_batch(s, bad)))) for s, bad in enumerate(SKIP_STEPS)]
        distributed.check_synchronized(learner)
        torch.save({"params": _snapshot(learner), "results": results},
                   out / f"skip-{case}-{ctx.rank}.pt")


def _worker_fail(out: Path, ctx: distributed.DistributedContext, mode: str) -> None:
    if mode == "nonfinite":
        _worker_nonfinite(out, ctx)
        return
    learner = _build("maml_uneven", seed=0)
    tasks = distributed.shard(_meta_batch(0, 4))
    if mode == "peer_lost":
        distributed.barrier()
        if ctx.rank == 1:
            os._exit(3)  # dies (as kill -9 would) while rank 0 enters the meta-step
        time.sleep(0.5)
        try:
            distributed.meta_step(learner, tasks)
            message = ""
        except RuntimeError as error:
            message = f"{type(error).__name__}: {error}"
        (out / "rank0-error.txt").write_text(message)
        os._exit(0)  # the process group is broken: skip the teardown
    if ctx.rank == 1:
        try:
            raise RuntimeError("injected failure before the collective")
        except RuntimeError:
            if mode == "crash":
                raise
            # "stall": the error is swallowed and the rank stays alive without ever joining
            # the collective (e.g. stuck in a data loader); only the timeout can help.
            time.sleep(LAUNCH_LIMIT)
            return
    started = time.monotonic()
    try:
        distributed.meta_step(learner, tasks)
    finally:
        (out / "rank0-seconds.txt").write_text(f"{time.monotonic() - started:.3f}")


def _worker(mode: str, out: Path, rank_: int, port: int) -> None:
    # A forked child of the test process: torch and the packages are already imported, so a
    # launch costs milliseconds instead of seconds of interpreter start-up per rank.
    log = open(out / f"log-{rank_}.txt", "w", buffering=1)  # noqa: SIM115 (lives with the process)
    os.dup2(log.fileno(), 1)  # C-level output (gloo) and Python's, not pytest's capture
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update({"RANK": str(rank_), "LOCAL_RANK": str(rank_), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    ctx = distributed.setup(device="cpu", timeout=FAIL_TIMEOUT if mode in ("crash", "stall")
                            else 60.0)
    assert ctx.backend == "gloo" and ctx.world_size == 2 and dist.is_initialized()
    if mode == "equal":
        _worker_equal(out, ctx)
    elif mode == "skip":
        _worker_skip(out, ctx)
    else:
        _worker_fail(out, ctx, mode)
    distributed.teardown()


# -- launching ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, *, wait_for: tuple[int, ...] = (0, 1)
            ) -> tuple[dict[int, int | None], dict[int, str], float]:
    """Starts 2 ranks; returns (exit codes of ``wait_for``, None if hung; logs; seconds)."""
    port = _free_port()
    context = mp.get_context("fork")
    procs = {r: context.Process(target=_worker, args=(mode, out, r, port), daemon=True)
             for r in range(2)}
    start = time.monotonic()
    try:
        for p in procs.values():
            p.start()
        codes: dict[int, int | None] = {}
        for r in wait_for:
            procs[r].join(timeout=max(1.0, start + LAUNCH_LIMIT - time.monotonic()))
            codes[r] = procs[r].exitcode
        seconds = time.monotonic() - start
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
    logs = {r: (out / f"log-{r}.txt").read_text() for r in range(2)}
    return codes, logs, seconds


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    codes, logs, _ = _launch("equal", out)
    assert codes == {0: 0, 1: 0}, f"ranks failed:\n{logs[0]}\n{logs[1]}"
    return out


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_single_process_meta_step(two_rank_run, case):
    initial, expected, expected_results, expected_eval = _single_process(case)
    ranks = [torch.load(two_rank_run / f"{case}-{r}.pt") for r in range(2)]
    # The steps moved every meta-parameter, so equality below is not that of an idle run.
    assert all((expected[n] - initial[n]).abs().max() > 1e-6 for n in initial)
    # One all-reduce per meta-step for all meta-parameters (float64 on the CPU): the kept and
    # skipped counts, the fault flag, each rank's share, the has-gradient flags and every
    # gradient element.
    size = 3 + 2 + len(expected) + sum(v.numel() for v in expected.values())
    for got in ranks:
        assert got["all_reduce"] == [size] * STEPS
        assert set(got["params"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-10)
        # Metrics are over the whole meta-batch, like a single process's.
        for mine, theirs in zip(got["results"], expected_results, strict=True):
            assert mine[4] == theirs[4]  # num_tasks
            assert mine[0] == pytest.approx(theirs[0], rel=1e-10, abs=1e-12)
            # metazoo.accuracy is float32, and so are the inner losses WarpGrad reports
            # (torch.tensor of Python floats): a single process averages them in float32.
            rel = 1e-6 if case == "warpgrad" else 1e-10
            assert mine[1] == pytest.approx(theirs[1], rel=rel, abs=1e-12)
            assert mine[2] == pytest.approx(theirs[2], rel=1e-6, abs=1e-7)
            assert mine[3] == pytest.approx(theirs[3], rel=rel, abs=1e-12)
        # Evaluation split over the ranks is that of the whole held-out batch, task by task.
        evaluation = metazoo.EvalResult(**got["evaluation"])
        assert evaluation.num_tasks == expected_eval.num_tasks
        assert evaluation.loss == pytest.approx(expected_eval.loss, rel=1e-10)
        assert evaluation.inner_losses == pytest.approx(expected_eval.inner_losses, rel=rel)
        assert len(evaluation.per_task) == len(expected_eval.per_task)
        for mine, theirs in zip(evaluation.per_task, expected_eval.per_task):
            assert mine == pytest.approx(theirs, rel=1e-10)
    for name in expected:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])


@pytest.mark.parametrize("case", SKIP_CASES)
def test_skipped_tasks_give_the_single_process_meta_step(skip_run, case):
    learner = _skipping(case)
    initial = _snapshot(learner)
    expected = [_results(learner.meta_step(_poisoned_batch(s, bad)))
                for s, bad in enumerate(SKIP_STEPS)]
    final = _snapshot(learner)
    assert all((final[n] - initial[n]).abs().max() > 1e-6 for n in initial)
    # The single process skipped what the ranks are compared on (num_tasks, skipped_tasks).
    assert [r[4] for r in expected] == [5] * len(SKIP_STEPS)
    assert [r[6] for r in expected] == [len(bad) for bad in SKIP_STEPS]
    for rank_ in range(2):
        got = torch.load(skip_run / f"skip-{case}-{rank_}.pt")
        for name, value in final.items():
            torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-10)
        for step, (mine, theirs) in enumerate(zip(got["results"], expected, strict=True)):
            assert (mine[4], mine[6]) == (theirs[4], theirs[6]), step  # num_tasks, skipped
            rel = 1e-6 if case == "warpgrad" else 1e-10  # WarpGrad reports float32 curves
            assert mine[0] == pytest.approx(theirs[0], rel=1e-10, nan_ok=True), step
            assert mine[1] == pytest.approx(theirs[1], rel=rel, nan_ok=True), step
            assert (mine[2] is None) == (theirs[2] is None), step
            if theirs[2] is not None:
                assert mine[2] == pytest.approx(theirs[2], rel=1e-6), step
            assert mine[3] == pytest.approx(theirs[3], rel=rel), step


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed-skip")
    codes, logs, _ = _launch("skip", out)
    assert codes == {0: 0, 1: 0}, f"ranks failed:\n{logs[0]}\n{logs[1]}"
    return out


def test_reduction_is_over_tasks_not_ranks():
    # The uneven case can tell them apart: rank 0 adapts 2 tasks and rank 1 one, so a mean of
    # the ranks' means would weigh the third task twice. Check the cases differ that way.
    learner = _build("maml_uneven", seed=0)
    tasks = _meta_batch(0, 3)
    learner.meta_backward(tasks[:2])
    first = {n: p.grad.clone() for n, p in learner.named_meta_parameters()}
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks[2:])
    second = {n: p.grad.clone() for n, p in learner.named_meta_parameters()}
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    for n, p in learner.named_meta_parameters():
        torch.testing.assert_close(p.grad, (2 * first[n] + second[n]) / 3, rtol=1e-12,
                                   atol=1e-14)
        assert not torch.allclose(p.grad, (first[n] + second[n]) / 2, rtol=1e-6, atol=0)


def test_two_ranks_report_a_desynchronised_parameter_on_every_rank(two_rank_run):
    messages = [(two_rank_run / f"desync-{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "rank 1" in messages[0] and "2.bias" in messages[0]
    assert "rank 0:" not in messages[0]


@pytest.mark.parametrize("mode", ["crash", "stall"])
def test_a_failed_rank_makes_the_other_exit_with_an_error(tmp_path, mode):
    codes, logs, seconds = _launch(mode, tmp_path, wait_for=(0,))
    assert codes[0] is not None, f"rank 0 hung after rank 1 failed:\n{logs[0]}"
    assert codes[0] != 0, logs[0]
    assert "injected failure" not in logs[0]  # rank 0 failed on its own, in the collective
    assert (tmp_path / "rank0-seconds.txt").exists(), logs[0]
    waited = float((tmp_path / "rank0-seconds.txt").read_text())
    if mode == "stall":
        assert waited >= FAIL_TIMEOUT * 0.9, logs[0]  # it waited for the timeout ...
        assert "timed out" in logs[0].lower() or "timeout" in logs[0].lower(), logs[0]
    else:
        assert "injected failure" in logs[1]
    assert waited < FAIL_TIMEOUT + 20  # ... and not much longer
    assert seconds < FAIL_TIMEOUT + 40  # the process exited too, start-up included


def test_a_lost_peer_is_explained_in_one_line(tmp_path):
    codes, logs, _ = _launch("peer_lost", tmp_path, wait_for=(0,))
    assert codes[0] == 0, logs[0]
    message = (tmp_path / "rank0-error.txt").read_text()
    assert message.startswith("PeerLostError: rank 0: another process of the distributed run "
                              "exited during the meta-step"), message
    assert "\n" not in message and "its own log" in message


def test_a_nonfinite_task_on_one_rank_stops_every_rank_at_once(tmp_path):
    codes, logs, _ = _launch("nonfinite", tmp_path)
    assert codes == {0: 0, 1: 0}, logs
    ranks = [torch.load(tmp_path / f"nonfinite-{r}.pt") for r in range(2)]
    # Rank 1 names its task by its index in the meta-batch (the second of its shard, task 3 of
    # the meta-batch, not 1); rank 0 says it was another rank's.
    assert ranks[1]["error"]["where"] == "inner" and ranks[1]["error"]["task"] == 3
    assert "task 3 of the meta-batch" in ranks[1]["error"]["message"]
    assert ranks[0]["error"]["where"] == "other_rank", ranks[0]["error"]
    assert "another process" in ranks[0]["error"]["message"]
    for rank in ranks:
        # Not after the process group's 60 s timeout: the fault travelled in the all-reduce.
        assert rank["seconds"] < 30, rank["seconds"]
        assert rank["unchanged"] and rank["no_grads"]
    # The process group is still usable and in step: the next meta-step agrees on every rank.
    assert ranks[0]["next"] == ranks[1]["next"] and ranks[0]["next"][4] == 4


def test_single_process_needs_no_setup(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_distributed) == (0, 1, None, False)
    assert not dist.is_initialized()
    assert distributed.is_main_process() and distributed.world_size() == 1
    distributed.barrier()
    tasks = _meta_batch(0, 3)
    assert distributed.shard(tasks) == tasks
    # The distributed meta-step is the plain one, bit for bit.
    plain, wrapped = _build("maml", 0), _build("maml", 0)
    expected = plain.meta_step(tasks)
    distributed.broadcast_learner(wrapped)
    got = distributed.meta_step(wrapped, tasks)
    assert _results(got) == _results(expected)
    for (name, p), (_, q) in zip(plain.named_meta_parameters(), wrapped.named_meta_parameters()):
        assert torch.equal(p, q), name
    distributed.check_synchronized(wrapped)
    # The hook leaves a single process's gradients alone.
    wrapped.meta_step(tasks, grad_hook=distributed.gradient_hook())
    plain.meta_step(tasks)
    for (_, p), (_, q) in zip(plain.named_meta_parameters(), wrapped.named_meta_parameters()):
        assert torch.equal(p.grad, q.grad)
    evaluation = distributed.evaluate(wrapped, tasks)
    assert evaluation == wrapped.evaluate(tasks)
    distributed.save_checkpoint(wrapped.state_dict(), tmp_path / "checkpoint.pt")
    restored = _build("maml", 1)
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pt"))
    for (_, p), (_, q) in zip(restored.named_meta_parameters(), wrapped.named_meta_parameters()):
        assert torch.equal(p, q)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left
    with ctx:
        pass  # leaving the context tears down nothing that was never set up
    assert not dist.is_initialized()


def test_setup_rejects_an_incomplete_environment_and_bad_timeouts(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR'"):
        distributed.setup(device="cpu")
    monkeypatch.delenv("RANK")
    for bad in (0, -1.0, float("inf"), float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout"):
            distributed.setup(timeout=bad)


def test_shards_are_contiguous_balanced_and_cover_the_meta_batch():
    for num_tasks in range(0, 9):
        for size in range(1, 5):
            ranges = [distributed.shard_range(num_tasks, rank=r, world_size=size)
                      for r in range(size)]
            assert [i for rng in ranges for i in rng] == list(range(num_tasks))
            lengths = [len(rng) for rng in ranges]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    assert distributed.shard(list("abc"), rank=1, world_size=2) == ["c"]
    assert distributed.shard(iter("abc"), rank=0, world_size=2) == ["a", "b"]  # a generator
    with pytest.raises(ValueError, match="got int"):
        distributed.shard(3)
    assert distributed.shard(list("a"), rank=1, world_size=2) == []
    with pytest.raises(ValueError, match="rank=2 must be < world_size=2"):
        distributed.shard_range(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_tasks"):
        distributed.shard_range(-1)
    with pytest.raises(ValueError, match="single Task"):
        distributed.shard(_task(0))


def test_rank_seeds_differ_between_ranks_and_repeat_between_runs():
    seeds = [distributed.rank_seed(7, rank=r) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [distributed.rank_seed(7, rank=r) for r in range(8)]
    assert distributed.rank_seed(8, rank=0) not in seeds
    assert distributed.rank_seed(7) == seeds[0]  # this process is rank 0
    used = distributed.seed_process(7, rank=3)
    first = torch.rand(3)
    distributed.seed_process(7, rank=3)
    assert used == seeds[3] and torch.equal(first, torch.rand(3))
    with pytest.raises(ValueError, match="seed"):
        distributed.rank_seed(-1)


def test_gradient_hook_weights_by_the_tasks_that_contributed(monkeypatch):
    """Skipped (non-finite) tasks do not count towards a process's weight in the mean."""
    counts = []
    monkeypatch.setattr(distributed, "all_reduce_meta_gradients",
                        lambda learner, *, num_tasks, skipped_tasks, group: counts.append(
                            (num_tasks, skipped_tasks)))
    hook = distributed.gradient_hook()
    nan = float("nan")
    hook(None, metazoo.MetaStepResult(nan, nan, None, (), 4, 0.0, skipped_tasks=1))
    hook(None, metazoo.MetaStepResult(nan, nan, None, (), 0, 0.0))
    assert counts == [(3, 1), (0, 0)]


