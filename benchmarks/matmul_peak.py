"""This machine's matrix-multiply peak in fp32 and bf16: the denominator of a stage's model FLOP utilisation.

    python benchmarks/matmul_peak.py [--sizes 256,512,1024,2048] [--seconds 2]

Times torch.matmul of square n x n matrices (2 n^3 FLOPs each) for about `--seconds` per size and dtype, with the
threads the pipeline's stages would take here (pipeline/threads.py; OMP_NUM_THREADS wins), after a warm-up, and
prints GFLOP/s per size and the best per dtype. A training stage's achieved FLOP/s is about 6 x parameters x
trained tokens/s (forward and backward over the weights, attention not counted); its share of the peak is its MFU.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gflops(n: int, dtype, seconds: float) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):  # warm-up: thread pool, kernels, caches
        torch.matmul(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    import torch

    from pipeline import threads

    n_threads = threads.configure()
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    table = {name: {n: gflops(n, dtype, args.seconds) for n in sizes} for name, dtype in dtypes.items()}
    print(f"\ntorch {torch.__version__}, {n_threads} thread(s), GFLOP/s of an n x n matmul")
    print("| dtype | " + " | ".join(f"n={n}" for n in sizes) + " | best |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.1f}" for n in sizes) + f" | {max(row.values()):.1f} |")
    best = {name: max(row.values()) for name, row in table.items()}
    print(f"bf16 / fp32 peak: {best['bf16'] / best['fp32']:.2f}x")


if __name__ == "__main__":
    main()
