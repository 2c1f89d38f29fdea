"""Run inside the emulated aarch64 Python by :mod:`.arm_count` (not imported on the host).

``python count_guest.py SPEC.json``: for each item of the spec, load it (a TVM Relax VM
library, a library of one kernel called with all its buffers, or an ONNX model for ONNX
Runtime), call it once (its output is the one checked) and ``warmup`` more times, then mark the
start, call it ``calls`` times (keeping no output) and mark the end; an empty region
(``EMPTY``) gives what the marks themselves cost. A mark is a system call no program makes,
``lseek(-1, 0xDC0 << 32 | label, SEEK_SET)`` (it fails with EBADF); qemu's dcgraph counter plugin
writes its cumulative instruction counts at each one. Item ``i`` is marked ``2i`` and ``2i + 1``.
Prints a JSON line as each item is done (the host's progress) and one at the end with every
item's output shape; an item with ``save`` writes its first output there (``.npy``), for the
host to check against the reference.
"""

import contextlib
import gc
import json
import os
import sys

import numpy as np

EMPTY = 1 << 20  #: the labels of the empty regions


def mark(label: int) -> None:
    with contextlib.suppress(OSError):
        os.lseek(-1, (0xDC0 << 32) | label, 0)


def _tvm(item: dict, arrays: list):
    import tvm

    dev = tvm.cpu()
    # what relax.VirtualMachine does, with TVM's runtime library alone (tvm.relax needs the compiler)
    vm = tvm.runtime.load_module(item["path"])["vm_load_executable"]()
    vm["vm_initialization"](dev.dlpack_device_type(), dev.index, 2)  # 2: the pooled allocator
    fn = vm[item.get("entry", "main")]
    args = [tvm.runtime.tensor(a, dev) for a in arrays]

    def call():
        out = fn(*args)
        return out[0] if not hasattr(out, "shape") else out

    return call


def _tvm_func(item: dict, arrays: list):
    import tvm

    dev = tvm.cpu()
    fn = tvm.runtime.load_module(item["path"])[item.get("entry", "main")]
    args = [tvm.runtime.tensor(a, dev) for a in arrays]  # a kernel's buffers, outputs included

    def call():
        fn(*args)
        return args[-1]

    return call


def _ort(item: dict, arrays: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(item["path"], so, providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays, strict=True)}
    return lambda: sess.run(None, feed)[0]


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    done = []
    # the cost of a marked region itself (the mark calls around it, the OSError they raise):
    # two empty regions, the host subtracts the second from every item's count
    for label in (EMPTY, EMPTY + 2):
        gc.collect()
        gc.disable()
        mark(label)
        mark(label + 1)
        gc.enable()
    for i, item in enumerate(spec["items"]):
        arrays = [np.load(p) for p in item["inputs"]]  # a copy per item: kernels write their outputs
        call = {"tvm": _tvm, "tvm_func": _tvm_func, "ort": _ort}[item["kind"]](item, arrays)
        out = call()  # the first call: its output is the one checked; then the warm-up calls
        if item.get("save"):
            np.save(item["save"], out.numpy() if hasattr(out, "numpy") else np.asarray(out))
        shapes = list(out.shape)
        del out
        for _ in range(spec["warmup"]):
            call()
        # counted calls keep no output alive: each allocates and frees the same way (steady state);
        # Python's cyclic collector, which runs after so many allocations, stays out of them
        gc.collect()
        gc.disable()
        mark(2 * i)
        for _ in range(spec["calls"]):
            call()
        mark(2 * i + 1)
        gc.enable()
        done.append({"name": item["name"], "shape": shapes})
        print(json.dumps({"item": i, "name": item["name"]}), flush=True)
    print(json.dumps({"done": done}), flush=True)


if __name__ == "__main__":
    main()
