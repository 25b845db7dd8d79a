"""Train the two reference nets on Fashion-MNIST (CPU, a few epochs) and save fp16 state dicts.

    python scripts/train_reference_models.py resnet20 --epochs 15 --threads 1

Augmentation: random 2-pixel shifts and horizontal flips. SGD with Nesterov momentum and a
one-cycle learning rate. Reproducible for a fixed seed (on the same machine and torch build).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autodac import zoo
from autodac.datasets import fashion_mnist

WEIGHTS = Path(__file__).resolve().parents[1] / "autodac" / "weights"


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    shifts = torch.randint(0, 5, (n, 2), generator=generator)
    out = torch.stack([padded[i, :, a : a + 28, b : b + 28] for i, (a, b) in enumerate(shifts.tolist())])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch", choices=["resnet20", "cifar_vgg"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    model = getattr(zoo, args.arch)().to(memory_format=torch.channels_last)
    steps_per_epoch = len(x_train) // args.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2
    )
    log = []
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = augment(x_train[index], generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        acc = accuracy(model, x_test, y_test)
        log.append({"epoch": epoch + 1, "test_accuracy": acc, "seconds": round(time.time() - start, 1)})
        print(json.dumps(log[-1]), flush=True)
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        torch.save(state, WEIGHTS / f"{args.arch}_fashion_mnist.pt")
    (WEIGHTS / f"{args.arch}_fashion_mnist.json").write_text(
        json.dumps({"arch": args.arch, "args": vars(args), "log": log}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
