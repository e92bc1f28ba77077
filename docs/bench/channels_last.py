"""Training-step throughput in the default (contiguous) and channels-last memory layouts.

    .venv/bin/python docs/bench/channels_last.py [--rounds 3] [--steps 4]

For each architecture and size: one training step (forward, backward, AdamW update) on a random batch of 32
one-channel images, timed `--steps` times after a warm-up step; the fastest step of each round, the layouts
taking turns round by round so a change in machine load hits both; the median over rounds is reported.
"""

import argparse
import statistics
import time

import torch

from cxr_fast.archs import create_model

CASES = [("tf_efficientnet_lite0", 224), ("cxresnet", 160), ("convnet", 160)]


def images_per_second(arch: str, size: int, channels_last: bool, steps: int, bs: int = 32) -> float:
    torch.manual_seed(0)
    model = create_model(arch, n_in=1, n_classes=3, weights="none")
    x, y = torch.randn(bs, 1, size, size), torch.randint(0, 3, (bs,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return bs / min(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for arch, size in CASES:
        rates = {False: [], True: []}
        for _ in range(args.rounds):
            for layout in (False, True):
                rates[layout].append(images_per_second(arch, size, layout, args.steps))
        plain, last = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{arch:24s} {size:4d} px  contiguous {plain:6.1f} img/s  channels-last {last:6.1f} img/s  "
              f"{last / plain:.2f}x")


if __name__ == "__main__":
    main()
