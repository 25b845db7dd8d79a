"""DistillOptions: a short training of the decomposed model towards the original's outputs, no labels needed.

Closed-form fits (per layer, then in execution order) repair what one layer can repair from its
own inputs; a deep cut of an efficient network (inverted residual blocks are mostly 1x1 convs
that are nearly full rank) also needs the layers to adapt to each other. DistillOptions trains
every parameter of the decomposed model to reproduce the original model's outputs on the
probe's calibration inputs, mixed in pairs (``x = l x_i + (1 - l) x_j``, ``l ~ Beta(a, a)``: the
original labels any input, so the mixtures are free examples and the student does not just
memorise the probe's few inputs). BatchNorm statistics stay fixed (small batches would make
them noise) and so does dropout. After each epoch the model is scored on the held-out half;
the best epoch is kept, and only when it beats the model as it came in.

The loss is the probe objective's own divergence (``autodac.probes.divergence``): KL from the
original's class scores for outputs with a class dimension, relative squared error otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from autodac.batches import Batch, Inputs, arguments, call, count, per_example
from autodac.errors import AutodacError, ModelError
from autodac.options import DistillOptions
from autodac.probes import batch_size_for

__all__ = ["DistillReport", "distill", "replay", "output_loss", "feature_loss"]

logger = logging.getLogger("autodac")


@dataclass(frozen=True)
class DistillReport:
    """What distillation did: the held-out ``(objective, metric)`` before, after each epoch, and whether it was kept."""

    before: tuple[float, float]
    epochs: list[tuple[float, float]]
    best_epoch: int  # 1-based; 0 when no epoch beat the model as it came in
    seconds: float

    @property
    def kept(self) -> bool:
        return self.best_epoch > 0


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (a tensor, or tuples, lists and dicts of them), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in _tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def output_loss(student_out: Any, teacher_out: Any) -> torch.Tensor:
    """Divergence of the student's outputs from the teacher's, summed over every floating output tensor.

    Class scores (a dimension 1 of more than one entry): KL(teacher || student) of the softmax over
    dim 1, averaged over the other positions. Anything else: squared error relative to the
    teacher's energy, so outputs of any scale weigh alike.
    """
    students, teachers = _tensors(student_out), _tensors(teacher_out)
    if not teachers or len(students) != len(teachers):
        raise ModelError("distillation needs a model whose outputs hold floating tensors (a tensor, or tuples/lists/dicts of them)")
    total = students[0].new_zeros(())
    for s, t in zip(students, teachers):
        s, t = s.float(), t.float()
        if s.dim() >= 2 and s.shape[1] > 1:
            log_t, log_s = torch.log_softmax(t, 1), torch.log_softmax(s, 1)
            total = total + (log_t.exp() * (log_t - log_s)).sum(1).mean()
        else:
            total = total + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
    return total


def _mixed(inputs: Batch, generator: torch.Generator, alpha: float) -> Batch:
    """``l x + (1 - l) x[perm]`` per example, every floating argument mixed with the same ``l`` and partner."""
    n = count(inputs)
    if alpha <= 0 or n < 2:
        return inputs
    partner = torch.randperm(n, generator=generator)
    weight = torch.distributions.Beta(alpha, alpha).sample((n,))  # drawn from torch's global generator, seeded by distill

    def mix(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        w = weight.to(x.device, x.dtype).reshape(n, *([1] * (x.dim() - 1)))
        return w * x + (1 - w) * x[partner.to(x.device)]

    parts = [mix(x) for x in arguments(inputs)]
    return Inputs(tuple(parts)) if isinstance(inputs, Inputs) else parts[0]


class _Taps:
    """The outputs of the named layers of a model during one forward pass (each a tensor), by name."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            def keep(_module, _args, output, name=name):
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    self.outputs[name] = output
            self.handles.append(model.get_submodule(name).register_forward_hook(keep))

    def take(self) -> dict[str, torch.Tensor]:
        taken, self.outputs = self.outputs, {}
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean over the layers both passes produced at the same shape of the squared error relative to the teacher's energy."""
    terms = [
        (s.float() - teacher[name].float()).pow(2).sum() / teacher[name].float().pow(2).sum().clamp_min(1e-12)
        for name, s in student.items() if name in teacher and s.shape == teacher[name].shape
    ]
    return torch.stack(terms).mean() if terms else None


def _training(model: nn.Module, teacher: nn.Module, inputs: Batch, settings: DistillOptions,
              progress: Callable[[int, int], None] | None, layers: Sequence[str] = ()) -> Iterator[float]:
    """Train ``model`` (in place) towards ``teacher`` on ``inputs``, yielding each epoch's mean loss as it ends.

    The schedule (a linear warm-up over the first epoch, then cosine over all ``settings.epochs``), the batch order and the mixing depend only
    on ``settings`` and ``inputs``, so stopping after epoch ``k`` gives the same weights whether or
    not later epochs follow: ``replay`` relies on it.
    """
    device = next(iter(model.parameters())).device
    params = [p for p in model.parameters() if p.is_floating_point()]
    wanted_grad = [p.requires_grad for p in params]
    n = count(inputs)
    batch = settings.batch_size or min(32, batch_size_for(per_example(inputs)))
    steps_per_epoch = math.ceil(n / batch)
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    warmup = steps_per_epoch  # a linear warm-up over the first epoch: Adam's first steps move every weight by about lr at once
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    generator = torch.Generator().manual_seed(settings.seed)
    modes = [(module, module.training) for module in (*model.modules(), *teacher.modules())]
    layers = list(layers) if settings.features > 0 else []
    student_taps, teacher_taps = _Taps(model, layers), _Taps(teacher, layers)
    with torch.random.fork_rng(devices=[]):  # the Beta draws use torch's global generator: seeded here, restored after
        torch.manual_seed(settings.seed)
        try:
            model.eval()  # BatchNorm statistics and dropout fixed: the batches are small and the probe few
            teacher.eval()
            for epoch in range(settings.epochs):
                for p in params:
                    p.requires_grad_(True)
                order = torch.randperm(n, generator=generator)
                running = 0.0
                for step in range(steps_per_epoch):
                    x = _mixed(inputs[order[step * batch : (step + 1) * batch]], generator, settings.mixup)
                    with torch.no_grad():
                        target = call(teacher, x, device)
                    with torch.enable_grad():
                        loss = output_loss(call(model, x, device), target)
                        matched = feature_loss(student_taps.take(), teacher_taps.take())
                        if matched is not None:
                            loss = loss + settings.features * matched
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                    schedule.step()
                    running += float(loss.detach())
                    if progress is not None:
                        progress(epoch * steps_per_epoch + step + 1, total)
                for p, wanted in zip(params, wanted_grad):
                    p.requires_grad_(wanted)
                yield running / steps_per_epoch
        finally:
            student_taps.close()
            teacher_taps.close()
            for module, training in modes:
                module.training = training
            for p, wanted in zip(params, wanted_grad):
                p.requires_grad_(wanted)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Batch,
    score: Callable[[nn.Module], tuple[float, float]],
    settings: DistillOptions = DistillOptions(),
    progress: Callable[[int, int], None] | None = None,
    layers: Sequence[str] = (),
) -> tuple[nn.Module, DistillReport]:
    """A copy of ``student`` trained to match ``teacher`` on ``inputs``, or ``student`` itself if no epoch scored better.

    ``score(model) -> (objective, metric)`` is measured on examples training never sees (the
    held-out probe); the kept epoch is the one with the highest objective, and it is kept only if
    its objective is higher and its metric not lower than ``student``'s. ``layers`` names modules (present
    in both models: the changed layers) whose outputs are matched too, where their shapes agree. ``teacher`` and
    ``student`` are not changed. Deterministic for a fixed seed and thread count.
    """
    start = time.perf_counter()
    before = score(student)
    model = copy.deepcopy(student)
    history: list[tuple[float, float]] = []
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor] | None] = (before, 0, None)
    with contextlib.closing(_training(model, teacher, inputs, settings, progress, layers)) as epochs:
        for epoch, loss in enumerate(epochs, 1):
            if not math.isfinite(loss):
                logger.info("distillation epoch %d: the loss is not finite; stopped", epoch)
                break
            measured = score(model)
            history.append(measured)
            logger.info("distillation epoch %d/%d: loss %.4g, held-out objective %.4g, metric %.4g", epoch, settings.epochs, loss, *measured)
            if measured[0] > best[0][0]:
                best = (measured, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    after, epoch, state = best
    seconds = time.perf_counter() - start
    if state is None or not (after[0] > before[0] and after[1] >= before[1]):
        return student, DistillReport(before, history, 0, seconds)
    model.load_state_dict(state)
    return model, DistillReport(before, history, epoch, seconds)


def replay(student: nn.Module, teacher: nn.Module, inputs: Batch, settings: DistillOptions, epoch: int, layers: Sequence[str] = ()) -> nn.Module:
    """A copy of ``student`` trained as ``distill`` trained it, stopped after ``epoch``: the model it kept, rebuilt without scoring."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= settings.epochs:
        raise AutodacError(f"the distillation epoch to replay must be an integer in [1, {settings.epochs}], but got {epoch!r}")
    model = copy.deepcopy(student)
    with contextlib.closing(_training(model, teacher, inputs, settings, None, layers)) as epochs:  # closing restores the modes
        for done, _ in enumerate(epochs, 1):
            if done == epoch:
                break
    return model
