"""DistillOptions: a short training of the decomposed model towards the original's outputs, no labels needed.

Closed-form fits (per layer, then in execution order) repair what one layer can repair from its
own inputs; a deep cut of an efficient network (inverted residual blocks are mostly 1x1 convs
that are nearly full rank) also needs the layers to adapt to each other. DistillOptions trains
every parameter of the decomposed model to reproduce the original model's outputs on the
probe's calibration inputs, mixed in pairs (``x = l x_i + (1 - l) x_j``, ``l ~ Beta(a, a)``: the
original labels any input, so the mixtures are free examples and the student does not just
memorise the probe's few inputs). BatchNorm statistics stay fixed (small batches would make
them noise) and so does dropout. After each epoch the model is scored on the held-out half: an
epoch that does not beat every one before is undone and the learning rate divided by three, so
one starting rate serves networks that need very different ones (ResNet-20 trains well at
1e-3; EfficientNet-Lite0 loses half its agreement in one epoch at 1e-4). The last accepted
epoch is kept, and only when it beats the model as it came in.

The loss is the probe objective's own divergence (``autodac.probes.divergence``): the KL from the
original's outputs that fits what they are (class scores, distributions, independent
probabilities; ``autodac.probes.output_kind``), relative squared error without a class dimension.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autodac.batches import Batch, Inputs, arguments, call, count, per_example
from autodac.errors import AutodacError, ModelError
from autodac.options import DistillOptions
from autodac.probes import activation_batch_size, batch_size_for, divergence_tensor
from autodac.surgery import copy_model

__all__ = ["DistillReport", "distill", "replay", "output_loss", "feature_loss"]

logger = logging.getLogger("autodac")


@dataclass(frozen=True)
class DistillReport:
    """What distillation did: the held-out ``(objective, metric)`` before, after each epoch, and whether it was kept."""

    before: tuple[float, float]
    epochs: list[tuple[float, float]]
    accepted: list[bool]  # per epoch up to the one kept (the last accepted); empty when the student was kept
    seconds: float

    @property
    def kept(self) -> bool:
        return bool(self.accepted)

    @property
    def best_epoch(self) -> int:
        """The epoch kept (1-based); 0 when none was."""
        return len(self.accepted)


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (a tensor, or tuples, lists and dicts of them), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in _tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def output_loss(student_out: Any, teacher_out: Any, kind: str | None = None) -> torch.Tensor:
    """Divergence of the student's outputs from the teacher's, summed over every floating output tensor.

    A dimension 1 of more than one entry: KL(teacher || student) over dim 1 of what the teacher's
    outputs are (``autodac.probes.output_kind``: a softmax of class scores, distributions as they
    are, a Bernoulli KL per entry for independent probabilities), averaged over the other
    positions. Anything else: squared error relative to the teacher's energy, so outputs of any
    scale weigh alike. ``kind`` (a key of ``autodac.probes.OUTPUT_KINDS``, as the probe decided it for
    the whole held-out half) applies to every output tensor; None reads each one's off the teacher's batch.
    """
    students, teachers = _tensors(student_out), _tensors(teacher_out)
    if not teachers or len(students) != len(teachers):
        raise ModelError("distillation needs a model whose outputs hold floating tensors (a tensor, or tuples/lists/dicts of them)")
    return sum((divergence_tensor(s.float(), t.float(), kind) for s, t in zip(students, teachers)), students[0].new_zeros(()))


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


_BACKOFF = 3.0  # a rejected epoch divides the learning rate by this (a third: two rejections span a decade)


class _Trainer:
    """Trains ``model`` (in place) towards ``teacher`` on ``inputs`` an epoch at a time; the caller accepts or rejects each.

    The learning rate of a step is ``lr`` times a linear warm-up over the first epoch of each run of
    accepted epochs, times a cosine decay over all ``settings.epochs``. A rejected epoch is undone:
    the weights go back to the last accepted ones, Adam starts afresh, and the learning rate is
    divided by ``_BACKOFF``. Batch order and mixing depend only on ``settings``, ``inputs`` and the
    decisions, so the same decisions give the same weights: ``replay`` relies on it. Used as a
    context: every module's mode, the parameters' ``requires_grad`` and torch's global generator
    are restored on exit.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, inputs: Batch, settings: DistillOptions,
                 progress: Callable[[int, int], None] | None = None, layers: Sequence[str] = (), kind: str | None = None) -> None:
        self.model, self.teacher, self.inputs, self.settings, self.progress = model, teacher, inputs, settings, progress
        self.kind = kind
        self.layers = list(layers) if settings.features > 0 else []
        self.device = next(iter(model.parameters())).device
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.n = count(inputs)
        # at most 32, as the inputs allow, and as the student's largest layer output allows (its backward keeps them all)
        self.batch = settings.batch_size or activation_batch_size(model, inputs, min(32, batch_size_for(per_example(inputs))))
        self.steps_per_epoch = math.ceil(self.n / self.batch)
        self.total = settings.epochs * self.steps_per_epoch
        self.step = 0  # steps taken, rejected ones included: the cosine runs on
        self.since = 0  # the step the current run of accepted epochs started at: its warm-up counts from there
        self.scale = 1.0
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr)

    def __enter__(self) -> "_Trainer":
        self.exit = contextlib.ExitStack()
        self.exit.enter_context(torch.random.fork_rng(devices=[]))  # the Beta draws use the global generator
        torch.manual_seed(self.settings.seed)
        modes = [(module, module.training) for module in (*self.model.modules(), *self.teacher.modules())]
        wanted = [p.requires_grad for p in self.params]
        taps = (_Taps(self.model, self.layers), _Taps(self.teacher, self.layers))
        self.student_taps, self.teacher_taps = taps

        def restore() -> None:
            for tap in taps:
                tap.close()
            for module, training in modes:
                module.training = training
            for p, grad in zip(self.params, wanted):
                p.requires_grad_(grad)

        self.exit.callback(restore)
        self.model.eval()  # BatchNorm statistics and dropout fixed: the batches are small and the probe few
        self.teacher.eval()
        return self

    def __exit__(self, *error: Any) -> None:
        self.exit.close()

    def _rate(self) -> float:
        warm = min(1.0, (self.step - self.since + 1) / self.steps_per_epoch)
        return self.settings.lr * self.scale * warm * 0.5 * (1 + math.cos(math.pi * min(self.step, self.total) / self.total))

    def epoch(self) -> float:
        """One pass over the inputs in a fresh order; the mean loss."""
        for p in self.params:
            p.requires_grad_(True)
        order = torch.randperm(self.n, generator=self.generator)
        running = 0.0
        for start in range(0, self.n, self.batch):
            x = _mixed(self.inputs[order[start : start + self.batch]], self.generator, self.settings.mixup)
            with torch.no_grad():
                target = call(self.teacher, x, self.device)
            with torch.enable_grad():
                loss = output_loss(call(self.model, x, self.device), target, self.kind)
                matched = feature_loss(self.student_taps.take(), self.teacher_taps.take())
                if matched is not None:
                    loss = loss + self.settings.features * matched
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            for group in self.optimizer.param_groups:
                group["lr"] = self._rate()
            self.optimizer.step()
            self.step += 1
            running += float(loss.detach())
            if self.progress is not None:
                self.progress(self.step, self.total)
        for p in self.params:
            p.requires_grad_(False)
        return running / self.steps_per_epoch

    def accept(self) -> None:
        self.kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def reject(self) -> None:
        self.model.load_state_dict(self.kept)
        self.optimizer = torch.optim.Adam(self.params, lr=self.settings.lr)
        self.scale /= _BACKOFF
        self.since = self.step


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Batch,
    score: Callable[[nn.Module], tuple[float, float]],
    settings: DistillOptions = DistillOptions(),
    progress: Callable[[int, int], None] | None = None,
    layers: Sequence[str] = (),
    kind: str | None = None,
) -> tuple[nn.Module, DistillReport]:
    """A copy of ``student`` trained to match ``teacher`` on ``inputs``, or ``student`` itself if no epoch scored better.

    ``score(model) -> (objective, metric)`` is measured after each epoch on examples training never
    sees (the held-out probe). An epoch whose objective beats every one before (the student's
    included) is accepted; any other is undone and the learning rate divided by three, so a rate
    too high for the network costs an epoch, not the model. The last accepted epoch is kept if its
    metric is not lower than ``student``'s. ``layers`` names modules (present in both models: the
    changed layers) whose outputs are matched too, where their shapes agree; ``kind`` is how outputs
    are compared (``output_loss``). ``teacher`` and
    ``student`` are not changed. Deterministic for a fixed seed and thread count.
    """
    start = time.perf_counter()
    before = score(student)
    model = copy_model(student)
    history: list[tuple[float, float]] = []
    accepted: list[bool] = []
    best = before
    with _Trainer(model, teacher, inputs, settings, progress, layers, kind) as trainer:
        for epoch in range(1, settings.epochs + 1):
            loss = trainer.epoch()
            measured = score(model) if math.isfinite(loss) else (-math.inf, -math.inf)
            history.append(measured)
            accepted.append(measured[0] > best[0])
            logger.info("distillation epoch %d/%d: loss %.4g, held-out objective %.4g, metric %.4g (%s)", epoch, settings.epochs, loss,
                        *measured, "accepted" if accepted[-1] else "undone, learning rate divided by 3")
            if accepted[-1]:
                best = measured
                trainer.accept()
            else:
                trainer.reject()
    seconds = time.perf_counter() - start
    if not any(accepted) or best[1] < before[1]:
        return student, DistillReport(before, history, [], seconds)
    last = max(i for i, a in enumerate(accepted) if a)
    return model, DistillReport(before, history, accepted[: last + 1], seconds)


def replay(student: nn.Module, teacher: nn.Module, inputs: Batch, settings: DistillOptions, accepted: Sequence[bool],
           layers: Sequence[str] = (), kind: str | None = None) -> nn.Module:
    """A copy of ``student`` trained as ``distill`` trained it, taking its decisions ``accepted`` (one per epoch) without scoring."""
    if not accepted or len(accepted) > settings.epochs or not accepted[-1] or not all(isinstance(a, bool) for a in accepted):
        raise AutodacError(
            f"the distillation to replay must be 1 to {settings.epochs} accept/reject decisions ending in an accepted epoch, but got {list(accepted)!r}"
        )
    model = copy_model(student)
    with _Trainer(model, teacher, inputs, settings, None, layers, kind) as trainer:
        for decision in accepted:
            trainer.epoch()
            trainer.accept() if decision else trainer.reject()
    return model
