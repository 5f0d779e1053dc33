"""Protocol presets of main.py: ``--meta_model warp_leap_tuned`` and ``--preset
reptile_authors`` (Reptile as its authors' code runs it), the latter against a hand emulation of
the authors' training and evaluation loops (openai/supervised-reptile) in float64."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import main
import meta_training
import protocols
import run_multi
from episodes import EpisodeSampler, inner_batches
from metazoo import Task
from wrapper import build_learner


def test_warp_leap_tuned_is_warp_leap_with_its_two_flags(omniglot_root, tmp_path, tiny,
                                                         same_log_files):
    """The name sets --warp_init identity --meta_kwargs warp_lr 1.0 and nothing else: its run
    writes the same logs, byte for byte, as warp_leap with the two flags, into its own folder."""
    tuned = main.main(tiny(omniglot_root, tmp_path / "a", "warp_leap_tuned"))
    flags = main.main(tiny(omniglot_root, tmp_path / "b", "warp_leap", "--warp_init", "identity",
                           "--meta_kwargs", "warp_lr", "1.0"))
    plain = main.main(tiny(omniglot_root, tmp_path / "c", "warp_leap"))
    same_log_files(tmp_path / "a" / "warp_leap_tuned" / "tmp", tmp_path / "b" / "warp_leap" / "tmp",
                   minimum=4)
    assert tuned == flags
    logs = sorted((tmp_path / "a" / "warp_leap_tuned" / "tmp").glob("results_*.log"))
    assert any(p.read_bytes() != (tmp_path / "c" / "warp_leap" / "tmp" / p.name).read_bytes()
               for p in logs)  # the two settings differ
    del plain


def test_warp_leap_tuned_flags_given_explicitly_win_and_run_multi_accepts_it():
    args = main.parse_args(["--meta_model", "warp_leap_tuned"])
    assert (args.warp_init, args.meta_kwargs) == ("identity", {"warp_lr": 1.0})
    assert main.learner_config(args).meta_model == "warp_leap"
    args = main.parse_args(["--meta_model", "warp_leap_tuned", "--meta_kwargs", "warp_lr", "0.5"])
    assert (args.warp_init, args.meta_kwargs) == ("identity", {"warp_lr": 0.5})
    assert main.parse_args(["--meta_model", "warp_leap"]).warp_init == "random"
    assert "warp_leap_tuned" in main.METHODS
    parsed, _ = run_multi.parse_args(["--methods", "warp_leap,warp_leap_tuned", "--seeds", "1"])
    assert list(parsed.methods) == ["warp_leap", "warp_leap_tuned"]


def test_reptile_authors_preset_sets_the_authors_protocol():
    args = main.parse_args(["--preset", "reptile_authors"])
    expected = {"meta_model": "reptile", "protocol": "fewshot", "ways": 5, "shots": 1,
                "queries": 1, "train_shots": 10, "rotations": True, "bn_eval": "transductive",
                "downsample": "stride", "meta_batch_size": 5, "meta_train_steps": 100000,
                "task_train_steps": 5, "inner_batch": 10, "task_val_steps": 50,
                "eval_inner_batch": 5, "inner_opt": "adam",
                "inner_kwargs": {"lr": 1e-3, "betas": (0, 0.999)},
                "reptile_inner_state": "carry", "outer_opt": "sgd",
                "outer_kwargs": {"lr": 1.0}, "outer_lr_schedule": "linear"}
    assert {k: getattr(args, k) for k in expected} == expected
    args = main.parse_args(["--preset", "reptile_authors", "--meta_train_steps", "150",
                            "--downsample", "pool"])
    assert (args.meta_train_steps, args.downsample, args.inner_batch) == (150, "pool", 10)
    assert main.parse_args([]).outer_lr_schedule == "constant"


def test_inner_batch_flags_need_the_fewshot_protocol():
    with pytest.raises(ValueError, match="--inner_batch 10: the alphabet protocol"):
        main.parse_args(["--inner_batch", "10"])
    with pytest.raises(ValueError, match="--eval_inner_batch 5"):
        main.parse_args(["--eval_inner_batch", "5"])


def authors_mini_batches(samples, batch_size, num_batches, shuffle):
    """``supervised_reptile.reptile._mini_batches(..., replacement=False)`` written out, with
    ``random.shuffle`` replaced by ``shuffle`` (a permutation of the list, in place)."""
    samples = list(samples)
    cur_batch, batch_count = [], 0
    while True:
        shuffle(samples)
        for sample in samples:
            cur_batch.append(sample)
            if len(cur_batch) < batch_size:
                continue
            yield cur_batch
            cur_batch = []
            batch_count += 1
            if batch_count == num_batches:
                return


def torch_shuffle(generator):
    def shuffle(items):
        items[:] = [items[int(i)] for i in torch.randperm(len(items), generator=generator)]
    return shuffle


@pytest.mark.parametrize("n, batch_size, count", [(50, 10, 5), (5, 10, 5), (9, 4, 7),
                                                  (5, 5, 50), (6, 4, 1)])
def test_inner_batches_are_the_authors_mini_batches(n, batch_size, count):
    xs = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1)
    ys = torch.arange(n) % 3
    task = Task([(xs, ys)], (xs[:1], ys[:1]))
    got = inner_batches(task, batch_size, count, torch.Generator().manual_seed(7))
    expected = authors_mini_batches(range(n), batch_size, count,
                                    torch_shuffle(torch.Generator().manual_seed(7)))
    assert [b[0].flatten().long().tolist() for b in got.support] == list(expected)
    assert all(torch.equal(b[1], ys[b[0].flatten().long()]) for b in got.support)
    assert got.query is task.query
    if (n, batch_size, count) == (50, 10, 5):  # one pass: every image exactly once
        assert sorted(i for b in got.support for i in b[0].flatten().long().tolist()) == \
            list(range(50))


def test_inner_batches_rejects_bad_input():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size=0"):
        inner_batches(Task([(x, y)], (x, y)), 0, 3, torch.Generator())
    with pytest.raises(ValueError, match="one support batch"):
        inner_batches(Task([(x, y), (x, y)], (x, y)), 2, 3, torch.Generator())


# -- the authors' loop, written out -------------------------------------------------------------

def _forward(model, params, buffers, x):
    """The authors' OmniglotModel pass: BatchNorm always on the batch's own statistics
    (``tf.layers.batch_normalization(training=True)``; running buffers are copies)."""
    model.train()
    return functional_call(model, {**params, **{k: v.clone() for k, v in buffers.items()}},
                           (x,))


def _adam_step(params, grads, state, lr=1e-3, beta2=0.999, eps=1e-8):
    """Adam with beta1 = 0 (the authors' ``DEFAULT_OPTIMIZER``) in torch's form; TensorFlow's
    Adam puts epsilon outside the bias correction (``eps * sqrt(1 - beta2^t)`` here), a
    difference below 1e-8 relative that this emulation does not model."""
    t = state["t"] + 1
    new_params, v_new = {}, {}
    for name, p in params.items():
        g = grads[name]
        v = beta2 * state["v"][name] + (1 - beta2) * g * g
        v_new[name] = v
        new_params[name] = p - lr * g / (v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps)
    return new_params, {"t": t, "v": v_new}


def _train_on(model, params, buffers, batches, state):
    for x, y in batches:
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(_forward(model, leaves, buffers, x), y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        params, state = _adam_step(params, grads, state)
    return params, state


def authors_loop(model, theta, buffers, sampler: EpisodeSampler, generator, args,
                 test_tasks, eval_generator):
    """``Reptile.train_step`` for ``args.meta_train_steps`` meta-steps with the step size
    ``frac_done * 0 + (1 - frac_done) * 1`` (``train.py``), then ``Reptile.evaluate`` on each
    test episode; returns the final initialisation and the test accuracies.

    Train step: for each of ``meta_batch_size`` episodes (``train_shots`` per class), reset the
    trainable variables to the old ones, run Adam on ``_mini_batches(inner_batch,
    task_train_steps)``; the Adam slots are global, not trainable, variables: they run on.
    Then ``theta <- theta + step * (mean(new) - theta)``. Evaluate: snapshot every variable (Adam
    slots included), Adam on ``_mini_batches(eval_inner_batch, task_val_steps)`` of the support,
    predict the query (one image per class) as one batch (``--transductive``), restore."""
    state = {"t": 0, "v": {k: torch.zeros_like(v) for k, v in theta.items()}}
    total = args.meta_train_steps
    for i in range(total):
        step_size = (i / total) * 0 + (1 - i / total) * 1.0
        indices = sampler.draw(args.meta_batch_size, generator)
        new = []
        for e in range(args.meta_batch_size):
            task = sampler.task(indices, e)
            (xs, ys), = task.support
            order = authors_mini_batches(range(len(ys)), args.inner_batch,
                                         args.task_train_steps, torch_shuffle(generator))
            batches = [(xs[b], ys[b]) for b in order]
            adapted, state = _train_on(model, dict(theta), buffers, batches, state)
            new.append(adapted)
        theta = {k: v + step_size * (sum(n[k] for n in new) / len(new) - v)
                 for k, v in theta.items()}
    accs, losses = [], []
    for task in test_tasks:
        (xs, ys), = task.support
        order = authors_mini_batches(range(len(ys)), args.eval_inner_batch,
                                     args.task_val_steps, torch_shuffle(eval_generator))
        adapted, _ = _train_on(model, dict(theta), buffers, [(xs[b], ys[b]) for b in order],
                               state)  # the state is not kept: restored after each episode
        with torch.no_grad():
            logits = _forward(model, adapted, buffers, task.query[0])
        accs.append(float((logits.argmax(1) == task.query[1]).double().mean()))
        losses.append(float(F.cross_entropy(logits, task.query[1])))
    return theta, accs, losses


def test_reptile_authors_protocol_equals_the_authors_loop(omniglot_root):
    """main.py's meta-training loop and few-shot evaluation under ``--preset reptile_authors``
    (mini-batches without replacement that cross passes, the carried Adam state, the annealed
    outer step, stride-2 net, one query per class, transductive BatchNorm), in float64, equal
    the authors' loop written out above: the final initialisation and every test episode."""
    args = main.parse_args([
        "--preset", "reptile_authors", "--root", str(omniglot_root), "--num_pretrain", "3",
        "--num_val", "0", "--num_test", "2", "--ways", "3", "--train_shots", "3",
        "--inner_batch", "4", "--task_train_steps", "3", "--eval_inner_batch", "2",
        "--task_val_steps", "4", "--meta_batch_size", "2", "--meta_train_steps", "4",
        "--num_filters", "4", "--test_episodes", "5", "--seed", "3", "--no_cuda",
        "--log_ival", "0", "--save_ival", "0", "--test_ival", "0"])
    exp = protocols.FewShotExperiment(args, torch.device("cpu"))
    for sampler in exp.samplers.values():
        sampler.dtype = torch.float64
    torch.manual_seed(0)
    learner = build_learner(main.learner_config(args))
    model = learner.model.double()  # in place: the meta-optimizer keeps the same parameters
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    run = meta_training.RunState(0, torch.Generator().manual_seed(11), random.Random(0))
    generator = torch.Generator()
    generator.set_state(run.data_generator.get_state())

    meta_training.meta_train(learner, exp, run, None, lambda line: None)
    exp.evaluate(learner, "test", run.step, None, lambda line: None)
    result = exp.results["test"]

    sampler, indices = exp.samplers["test"], exp.indices["test"]
    test_tasks = [sampler.task(indices, i) for i in range(len(indices))]
    theta, accs, losses = authors_loop(model, theta0, buffers, exp.samplers["train"], generator,
                                       args, test_tasks, exp.eval_batch_generator("test"))
    conv_biases = {f"blocks.{i}.0.bias" for i in range(4)}
    for name, p in model.named_parameters():
        # A conv bias followed by batch-statistics BatchNorm has an exact gradient of 0; its
        # computed gradient is rounding noise (~1e-17), which Adam divides by its own size, so
        # the two implementations' different rounding moves these biases differently (1e-8
        # here). BatchNorm subtracts them again: the outputs below agree to 1e-10.
        atol = 1e-6 if name in conv_biases else 1e-12
        torch.testing.assert_close(p.detach(), theta[name], rtol=0, atol=atol)
        assert not torch.equal(p.detach(), theta0[name])
    assert result.accuracy.mean == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert result.loss == pytest.approx(sum(losses) / len(losses), abs=1e-10)
    # the last meta-step ran at step size 1 - 3/4, and the schedule is in the optimizer
    assert learner.meta_optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    assert learner.meta_optimizer.param_groups[0]["initial_lr"] == 1.0


def test_lightning_main_refuses_what_only_main_runs(omniglot_root, tmp_path):
    """Lightning's loop has no outer schedule and no evaluation mini-batches: refused, not
    silently ignored."""
    lightning_main = pytest.importorskip("lightning_main")
    from metazoo.cli import UsageError

    for extra in (["--preset", "reptile_authors"], ["--outer_lr_schedule", "linear"]):
        with pytest.raises(UsageError, match=r"lightning_main\.py does not run it"):
            lightning_main.main_lightning(["--root", str(omniglot_root), "--log_dir",
                                           str(tmp_path), "--no_cuda", *extra])


def test_linear_outer_lr_schedule_needs_a_meta_optimizer():
    class NoOptimizer:
        pass

    with pytest.raises(ValueError, match="--outer_lr_schedule linear needs a learner"):
        meta_training.anneal_meta_lr(NoOptimizer(), 0, 10)  # type: ignore[arg-type]


def test_reptile_authors_run_resumes_exactly(omniglot_root, tmp_path, same_log_files):
    """Stop and --resume under the preset (annealed step, carried Adam state, mini-batches from
    the saved generator) give the same logs as one straight run."""
    flags = ["--preset", "reptile_authors", "--root", str(omniglot_root), "--num_pretrain", "3",
             "--num_val", "1", "--num_test", "2", "--ways", "3", "--train_shots", "3",
             "--task_val_steps", "3", "--num_filters", "4", "--test_episodes", "3",
             "--val_episodes", "2", "--test_ival", "1", "--no_cuda", "--log_ival", "0",
             "--seed", "2", "--log_dir", str(tmp_path), "--meta_train_steps", "3"]
    main.main([*flags, "--suffix", "straight"])
    # stopped after the first meta-step (its step size, 1 - 0/N, is the same for any N)
    main.main([*flags, "--suffix", "resumed", "--meta_train_steps", "1"])
    main.main([*flags, "--suffix", "resumed", "--resume"])
    same_log_files(tmp_path / "reptile" / "straight", tmp_path / "reptile" / "resumed",
                   minimum=4)
