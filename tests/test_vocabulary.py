"""Every learner is built from one shared dictionary of keywords plus its own options
(``docs/learners.md``) and answers ``meta_step``/``evaluate`` with the same result types; the
shared checks (criterion, meta-optimizer, tasks, target shapes) refuse bad input the same way
in every learner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leap
import maml
import metazoo
import warpgrad

INNER_STEPS, EVAL_STEPS = 3, 2


class Net(nn.Module):
    """body -> warp -> head: the warp layer is an ordinary layer for non-warped learners."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.warp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.warp(torch.tanh(self.body(x)))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def _tasks(count: int = 3, seed: int = 1) -> list[metazoo.Task]:
    """One synthetic family: 3-way classification of Gaussian blobs with per-task centres."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        centres = torch.randn(3, 4, generator=g, dtype=torch.float64) * 2

        def batch(centres: torch.Tensor = centres, n: int = 6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % 3
            return centres[y] + 0.3 * torch.randn(n, 4, generator=g, dtype=torch.float64), y

        tasks.append(metazoo.Task(support=[batch(), batch()], query=batch()))
    return tasks


def _shared(criterion) -> dict:
    return dict(criterion=criterion, inner_optimizer=metazoo.SGD(0.1), inner_steps=INNER_STEPS,
                eval_inner_steps=EVAL_STEPS,
                meta_optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


#: Each learner: its class and its own options (added to the shared keywords).
LEARNERS = {
    "maml": (maml.MAML, {}),
    "fomaml": (maml.MAML, {"first_order": True}),
    "anil": (maml.MAML, {"frozen": lambda name: not name.startswith("head.")}),
    "metasgd": (maml.MAML, {"learn_inner_lr": "per_element"}),
    "maml++": (maml.MAML, {"learn_inner_lr": "per_tensor", "per_step_inner_lr": True,
                           "multi_step_weights": [0.2, 0.3, 0.5], "checkpoint": True}),
    "reptile": (maml.Reptile, {"inner_state": "carry"}),
    "imaml": (maml.iMAML, {"lam": 2.0, "cg_steps": 3}),
    "leap": (leap.LeapLearner, {"norm": False}),
    "warpgrad": (warpgrad.WarpGrad, {"warp_modules": ["warp"]}),
}


@pytest.mark.parametrize("criterion", [F.cross_entropy, nn.CrossEntropyLoss()],
                         ids=["function", "module"])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_from_one_shared_dictionary(name, criterion):
    cls, own = LEARNERS[name]
    learner = cls(model=_net(), **_shared(criterion), **own)
    assert isinstance(learner, metazoo.MetaLearner)
    assert isinstance(learner.meta_optimizer, torch.optim.SGD)
    before = {n: p.detach().clone() for n, p in learner.named_meta_parameters()}
    tasks = _tasks()
    step = learner.meta_step(tasks)
    assert type(step) is metazoo.MetaStepResult
    assert isinstance(step.meta_loss, float) and isinstance(step.accuracy, float)
    assert len(step.inner_losses) == INNER_STEPS and step.num_tasks == len(tasks)
    moved = [n for n, p in learner.named_meta_parameters() if not torch.equal(p, before[n])]
    assert moved, "the meta-step changed no meta-parameter"
    result = learner.evaluate(tasks)
    assert type(result) is metazoo.EvalResult
    assert isinstance(result.loss, float) and isinstance(result.accuracy, float)
    assert len(result.inner_losses) == EVAL_STEPS and len(result.per_task) == len(tasks)
    adapted = learner.adapt(tasks[0])
    assert type(adapted) is metazoo.Adapted and len(adapted.inner_losses) == EVAL_STEPS


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_a_meta_optimizer_over_other_tensors_is_refused(name):
    """Issue 28: ``lambda ps: torch.optim.SGD(other.parameters(), lr=.5)`` stepped nothing of
    the learner's (0 of 4 meta-parameters changed after 3 meta-steps); every learner now
    refuses it with one line naming what is missing and the fix."""
    cls, own = LEARNERS[name]
    other = _net(seed=5)
    shared = _shared(F.cross_entropy)
    for wrong, message in [
            (lambda ps: torch.optim.SGD(other.parameters(), lr=0.5),
             r"leaves out the meta-parameters \[.*\] and holds \d+ tensor"),
            (lambda ps: torch.optim.SGD(list(ps)[:1], lr=0.5), "leaves out the meta-parameters"),
            (torch.optim.SGD(other.parameters(), lr=0.5), "leaves out the meta-parameters")]:
        with pytest.raises(ValueError, match=message) as error:
            cls(model=_net(), **{**shared, "meta_optimizer": wrong}, **own)
        assert "\n" not in str(error.value) and "lambda params" in str(error.value)


@pytest.mark.parametrize("name", ["maml", "reptile", "imaml", "leap"])
def test_a_meta_optimizer_instance_over_the_meta_parameters_is_taken(name):
    cls, own = LEARNERS[name]
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    learner = cls(model=model, **{**_shared(F.cross_entropy), "meta_optimizer": optimizer},
                  **own)
    assert learner.meta_optimizer is optimizer


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_shared_checks_refuse_bad_input_in_every_learner(name):
    cls, own = LEARNERS[name]
    with pytest.raises(ValueError, match=r"criterion=MSELoss is a class; pass an instance"):
        cls(model=_net(), **{**_shared(F.cross_entropy), "criterion": nn.MSELoss}, **own)
    learner = cls(model=_net(), **_shared(F.cross_entropy), **own)
    task = _tasks(1)[0]
    as_tuple = (task.support, task.query)
    with pytest.raises(TypeError, match=r"task must be a metazoo\.Task, got tuple"):
        learner.adapt(as_tuple)
    for method in (learner.meta_step, learner.evaluate):
        with pytest.raises(TypeError, match=r"tasks\[0\] must be a metazoo\.Task, got tuple"):
            method([as_tuple])
        with pytest.raises(TypeError, match=r"tasks must be a list of metazoo\.Task, got int"):
            method(3)
    # A generator is read once, as a list would be.
    assert type(learner.evaluate(t for t in [task])) is type(learner.evaluate([task]))


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_a_target_that_broadcasts_to_another_shape_is_refused(name):
    """Issue 25: a regression target ``(N,)`` against an output ``(N, 1)`` got only PyTorch's
    warning and trained on the wrong loss; now a ``ValueError`` names both shapes."""
    cls, own = LEARNERS[name]
    torch.manual_seed(0)
    model = _net()
    model.head = nn.Linear(8, 1).double()  # one regression output
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(5, 4, generator=g, dtype=torch.float64),
                torch.randn(5, generator=g, dtype=torch.float64))

    learner = cls(model=model, **{**_shared(F.mse_loss), "criterion": F.mse_loss}, **own)
    task = metazoo.Task(support=[batch()], query=batch())
    message = r"target's shape \(5,\) broadcasts against the output's shape \(5, 1\) to \(5, 5\)"
    for call in (lambda: learner.meta_step([task]), lambda: learner.evaluate([task]),
                 lambda: learner.adapt(task)):
        with pytest.raises(ValueError, match=message):
            call()
    # The same targets as (N, 1) train.
    fixed = metazoo.Task(support=[(x, y.view(-1, 1)) for x, y in task.support],
                         query=(task.query[0], task.query[1].view(-1, 1)))
    assert learner.meta_step([fixed]).accuracy is None


# -- learners by name ---------------------------------------------------------------------------

def _declared_learners() -> dict[str, str]:
    """name -> object of every ``metazoo.learners`` entry point in the packages' pyprojects."""
    import tomllib
    from pathlib import Path

    declared = {}
    for pyproject in (Path(__file__).resolve().parents[1] / "src").glob("*/pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        declared.update(project.get("entry-points", {}).get("metazoo.learners", {}))
    return declared


#: registry name -> the LEARNERS entry whose own options it is built with, and its extra ones.
BY_NAME = {"maml": ("maml", {}), "fomaml": ("maml", {}), "anil": ("maml", {}),
           "metasgd": ("maml", {}), "reptile": ("reptile", {}), "imaml": ("imaml", {}),
           "leap": ("leap", {}), "warpgrad": ("warpgrad", {}), "warp_leap": ("warpgrad", {}),
           "warp_maml": ("warpgrad", {"checkpoint": True})}


def test_every_declared_learner_is_installed():
    declared = _declared_learners()
    assert set(declared) == set(BY_NAME)
    missing = sorted(set(declared) - set(metazoo.available_learners()))
    assert not missing, (f"learners {missing} are declared in the pyprojects but not in the "
                         f"installed metadata; reinstall the packages (scripts/setup.sh --dev)")


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_learner_by_name_from_one_shared_dictionary(name):
    base, extra = BY_NAME[name]
    learner = metazoo.build_learner(name, model=_net(), **_shared(F.cross_entropy),
                                    **LEARNERS[base][1], **extra)
    tasks = _tasks()
    step = learner.meta_step(tasks)
    assert type(step) is metazoo.MetaStepResult and len(step.inner_losses) == INNER_STEPS
    result = learner.evaluate(tasks)
    assert type(result) is metazoo.EvalResult and len(result.inner_losses) == EVAL_STEPS
    assert isinstance(step.accuracy, float) and isinstance(result.accuracy, float)


def test_named_variants_are_their_options():
    shared = dict(model=_net(), **_shared(F.cross_entropy))
    assert metazoo.build_learner("fomaml", **shared).first_order is True
    assert metazoo.build_learner("metasgd", **{**shared, "model": _net()}).learn_inner_lr == (
        "per_element")
    anil = metazoo.build_learner("anil", **{**shared, "model": _net()})
    assert anil._adapted_names == ["head.weight", "head.bias"]
    assert metazoo.build_learner("warp_leap", **{**shared, "model": _net()},
                                 warp_modules="warp").updater.init_objective is not None
    with pytest.raises(ValueError, match=r"learner 'fomaml' sets \['first_order'\] itself"):
        metazoo.build_learner("fomaml", **{**shared, "model": _net()}, first_order=False)
    with pytest.raises(ValueError, match="head='classifier', which the model does not have"):
        metazoo.build_learner("anil", **{**shared, "model": _net()}, head="classifier")
