"""How much does autograd keep? Saved-activation bytes per block, fused vs BatchNorm vs plain.

Counts the storages autograd saves for backward (each once, deterministic; see
:mod:`dcgraph.memory`), at ResNet-18's layer1 shape (64 channels, 56x56), batch 8:

- one conv -> norm -> relu block, its input included (the block on its own);
- a stack of such blocks, where each block's output is the next one's saved input
  (activations the stack creates; the network input is the caller's);
- a ResNet basic block (conv-norm-relu, conv-norm, + skip, relu), stacked;
- the built-in DCNet;
- torchvision's ``BasicBlock`` (``zoo.BasicBlock``) rewritten by the passes (the residual tail
  inside the fused op), training mode: the marginal bytes of 4 more blocks (8 blocks minus 4).

Targets (operator issue): one block at most 2/3 of BatchNorm's, a stack at most 0.5x.

    python benchmarks/saved_memory.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from dcgraph import zoo
from dcgraph.bench.common import machine_info, use_results_dir, write_results
from dcgraph.memory import saved_bytes

#: this checkout's committed results
RESULTS = use_results_dir(Path(__file__).resolve().parent / "results")


class BasicBlock(nn.Module):
    """ResNet's basic block with the chosen block variant (second conv without activation)."""

    def __init__(self, block: str, width: int) -> None:
        super().__init__()
        self.c1 = zoo.conv_block(block, width, width, act="relu")
        self.c2 = zoo.conv_block(block, width, width, act="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c2(self.c1(x)) + x)


def measure(make, x: torch.Tensor) -> dict[str, int]:
    net = make()
    s = saved_bytes(lambda: net(x), inputs=[x], modules=[net])
    return {"activations": s.activations, "with_input": s.with_inputs}


def _rewritten_blocks(block: str, depth: int) -> nn.Module:
    """``depth`` of torchvision's basic blocks, as written (batchnorm) or rewritten by the passes."""
    import warnings

    from dcgraph.passes.fx import rewrite

    torch.manual_seed(0)
    model = nn.Sequential(*[zoo.BasicBlock(64, 64) for _ in range(depth)]).train()
    if block == "batchnorm":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = rewrite(model, init="fresh", fuse_blocks=block == "fused")
    return net.train()


def marginal_blocks(block: str, x: torch.Tensor) -> int:
    """Saved activation bytes of 8 rewritten basic blocks minus those of 4."""
    sizes = [measure(lambda d=d: _rewritten_blocks(block, d), x)["activations"] for d in (4, 8)]
    return sizes[1] - sizes[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="batch 1 (smoke test)")
    args = parser.parse_args(argv)
    batch = 1 if args.quick else args.batch
    x = torch.randn(batch, 64, 56, 56, requires_grad=True)
    img = torch.randn(batch, 3, 64, 64, requires_grad=True)
    setups = {
        "one block": (lambda b: zoo.conv_block(b, 64, 64), x, "with_input"),
        "stack of 4 blocks": (lambda b: nn.Sequential(*[zoo.conv_block(b, 64, 64) for _ in range(4)]),
                              x, "activations"),
        "4 ResNet basic blocks": (lambda b: nn.Sequential(*[BasicBlock(b, 64) for _ in range(4)]),
                                  x, "activations"),
        "DCNet (6 blocks, 64x64 input)": (lambda b: zoo.dcnet(b), img, "activations"),
    }
    rows = []
    for name, (make, inp, key) in setups.items():
        res = {b: measure(lambda b=b, make=make: make(b), inp) for b in zoo.BLOCKS}
        rows.append({"setup": name, "counted": key, **{f"{b}_bytes": res[b][key] for b in zoo.BLOCKS}})
    rows.append({"setup": "4 more torchvision BasicBlocks, rewritten by the passes (marginal: 8 - 4)",
                 "counted": "activations", **{f"{b}_bytes": marginal_blocks(b, x) for b in zoo.BLOCKS}})
    lines = [
        f"Bytes autograd saves for backward (each storage once), batch {batch}, fp32. "
        "'one block' includes the block input; the others count the activations the network "
        "creates (its input is the caller's).",
        "",
        "| setup | fused DC MiB | plain DC MiB | BatchNorm MiB | fused / BatchNorm | fused / plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, p, bn = r["fused_bytes"], r["plain_bytes"], r["batchnorm_bytes"]
        lines.append(f"| {r['setup']} | {f / 2**20:.2f} | {p / 2**20:.2f} | {bn / 2**20:.2f} | "
                     f"{f / bn:.3f} | {f / p:.3f} |")
    md = "\n".join(lines)
    paths = write_results("saved_memory_quick" if args.quick else "saved_memory",
                          {"machine": machine_info(), "batch": batch, "rows": rows}, md)
    print(md)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
