"""The ARM cost measure (:mod:`dcgraph.backends.tvm.remote.arm_count`): the plugin's instruction
classes against encodings from the cross assembler, and counts of real kernels under emulation:
reproducible, per call, outputs equal to the reference, vector FMA lanes that match the direct
conv's multiply-adds.

Each emulated run starts an aarch64 Python under qemu with the plugin (~10-20 s)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from dcgraph import reference as R  # noqa: E402
from dcgraph.backends.tvm.remote import arm_count as ac  # noqa: E402

# (assembly, class, FMA lanes): the classes count_plugin.c gives each instruction
ENCODINGS = [
    ("fmla v0.4s, v1.4s, v2.4s", "fma", 4),
    ("fmla v3.4s, v4.4s, v5.s[2]", "fma", 4),
    ("fmls v0.2s, v1.2s, v2.2s", "fma", 2),
    ("fmla v0.2d, v1.2d, v2.2d", "fma", 2),
    ("fadd v0.4s, v1.4s, v2.4s", "vector", 0),
    ("fmax v0.4s, v1.4s, v2.4s", "vector", 0),
    ("dup v0.4s, v1.s[0]", "vector", 0),
    ("fmadd s0, s1, s2, s3", "scalar_fp", 0),
    ("fadd s0, s1, s2", "scalar_fp", 0),
    ("ldr q0, [x0, #16]", "ldst", 0),
    ("ld1 {v0.4s}, [x1], #16", "ldst", 0),
    ("str s1, [x2]", "ldst", 0),
    ("ldp x0, x1, [sp]", "ldst", 0),
    ("b.ne .", "branch", 0),
    ("ret", "branch", 0),
    ("add x0, x0, #1", "scalar_int", 0),
    ("madd x0, x1, x2, x3", "scalar_int", 0),
]

HARNESS = """
#include "count_plugin.c"
/* qemu's side of the plugin API, never called here */
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t i, tb_trans_cb_t c) {}
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *t, enum qemu_plugin_op o, void *p,
                                              uint64_t n) {}
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *t) { return 0; }
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *t, size_t i) { return 0; }
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *i) { return 0; }
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *i) { return 0; }
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t i, syscall_cb_t c) {}
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t i, udata_cb_t c, void *p) {}
int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    unsigned lanes; int k = classify((uint32_t)strtoul(argv[i], 0, 16), &lanes);
    printf("%d %u\\n", k, lanes);
  }
  return 0;
}
"""


def test_classes_of_assembled_instructions(tmp_path: Path) -> None:
    gcc, objcopy = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objcopy"
    if not (shutil.which(gcc) and shutil.which(objcopy) and shutil.which("gcc")):
        pytest.skip("the aarch64 cross binutils or gcc are missing (make arm-setup)")
    src = tmp_path / "insns.s"
    src.write_text("".join(f"  {asm}\n" for asm, _, _ in ENCODINGS))
    subprocess.run([gcc, "-c", src, "-o", tmp_path / "insns.o"], check=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", tmp_path / "insns.o", tmp_path / "insns.bin"],
                   check=True)
    words = np.frombuffer((tmp_path / "insns.bin").read_bytes(), dtype="<u4")
    assert len(words) == len(ENCODINGS)
    (tmp_path / "harness.c").write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(["gcc", "-O1", f"-I{ac.PLUGIN_SOURCE.parent}", "-o", exe, tmp_path / "harness.c"],
                   check=True)
    out = subprocess.run([exe, *(f"{w:x}" for w in words)], capture_output=True, text=True, check=True).stdout
    got = [(ac.CLASSES[int(k)], int(lanes)) for k, lanes in (ln.split() for ln in out.splitlines())]
    assert got == [(cls, lanes) for _, cls, lanes in ENCODINGS]


@pytest.fixture(scope="module")
def counter() -> ac.Counter:
    try:
        return ac.ensure_counter()
    except ac.EmulationUnavailable as exc:
        pytest.skip(f"ARM instruction counting unavailable: {exc}")


def _block(groups: int, tmp: Path) -> tuple[ac.Item, np.ndarray, float]:
    """A direct 3x3 conv + Deep Control block (no Winograd: its MACs are the direct conv's),
    exported for aarch64; its input, reference output and MACs."""
    from dcgraph.backends.tvm.modules import block_module
    from dcgraph.backends.tvm.pipeline import relax_pipeline
    from dcgraph.backends.tvm.remote.arm_server import arm_target, cross_compiler

    rng = np.random.default_rng(groups)
    cin = cout = 32
    x = rng.standard_normal((1, cin, 13, 13)).astype("float32")
    consts = {"weight": (rng.standard_normal((cout, cin // groups, 3, 3)) * 0.2).astype("float32"),
              "a": rng.random(cout).astype("float32"), "g": (0.5 + rng.random(cout)).astype("float32"),
              "b": rng.standard_normal(cout).astype("float32")}
    mod = block_module("fused", x.shape, consts["weight"].shape, act="relu", padding=1, groups=groups,
                       consts=consts)
    tgt = arm_target()
    ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt, winograd=False))
    path = tmp / f"block_g{groups}.so"
    ex.export_library(str(path), fcompile=cross_compiler())
    import torch

    t = {k: torch.from_numpy(v).double() for k, v in consts.items()}
    want = R.conv_deep_control(torch.from_numpy(x).double(), t["weight"], None, t["a"], t["g"], t["b"], 1, 1,
                               groups=groups, act="relu").numpy()
    macs = cout * (cin // groups) * 9 * 13 * 13
    return ac.Item(f"g{groups}", "tvm", str(path), [x]), want, macs


def test_counts_are_reproducible_per_call_and_match_the_work(counter: ac.Counter, tmp_path: Path) -> None:
    dense, want, macs = _block(1, tmp_path)
    same = ac.Item("again", dense.kind, dense.path, dense.inputs)
    outputs: dict[str, np.ndarray] = {}
    three = ac.count([dense, same], counter, calls=3, outputs=outputs)
    # the same items counted again in another process: the kernel's vector work instruction for
    # instruction; the call's Python and allocator share moved by a few dozen instructions between
    # processes on the Intel machines (identical on the AMD ones), so the totals to 1e-4
    again = ac.count([dense, same], counter, calls=3, outputs={})
    for name, c in again.items():
        assert (c.fma, c.fma_lanes, c.vector) == (three[name].fma, three[name].fma_lanes, three[name].vector)
        assert c.total == pytest.approx(three[name].total, rel=1e-4)
    # another position in the process, another number of calls: the kernel's work is exact, the
    # call's Python and allocator share (a few thousand instructions) moves a little
    one = ac.count([dense], counter, calls=1)["g1"]
    for c in (three["again"], one):
        assert c.fma == three["g1"].fma and c.fma_lanes == three["g1"].fma_lanes
        assert c.total == pytest.approx(three["g1"].total, rel=5e-3)
    got = outputs["g1"].astype(np.float64)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    c = three["g1"]
    assert c.total == pytest.approx(sum(getattr(c, k) for k in ac.CLASSES if k not in ("total", "fma_lanes")),
                                    rel=1e-12)  # per-call means: float sums
    # a direct conv's multiply-adds run as 4-lane FMAs: at least every MAC, at most the padded tiles'
    assert macs <= c.fma_lanes <= 1.6 * macs
    assert c.fma_share >= 0.5, c


def test_onnx_runtime_is_counted_the_same_way(counter: ac.Counter, tmp_path: Path) -> None:
    import torch

    from dcgraph.bench.onnx_graphs import onnx_model
    from dcgraph.bench.shapes import OpShape

    s = OpShape("t", "test", 32, 32, 13, 3, 1, 1, "relu")
    t = s.tensors(1)
    outputs: dict[str, np.ndarray] = {}
    got = ac.count_objects({"conv": onnx_model("conv", s, t)}, [t["x"].numpy()], counter, outputs=outputs)
    want = torch.nn.functional.conv2d(t["x"].double(), t["weight"].double(), padding=1).numpy()
    assert np.abs(outputs["conv"] - want).max() <= 1e-4 * np.abs(want).max()
    macs = s.flops(1) / 2
    assert macs <= got["conv"].fma_lanes <= 2 * macs  # MLAS's NEON conv: FMAs for the MACs
    assert got["conv"].fma_share >= 0.3


def test_errors_are_clear(counter: ac.Counter, tmp_path: Path) -> None:
    x = [np.zeros((1, 3), "float32")]
    with pytest.raises(ValueError, match="kind must be one of"):
        ac.count([ac.Item("a", "tflite", "m.tflite", x)], counter)
    with pytest.raises(ValueError, match="unique"):
        ac.count([ac.Item("a", "ort", "m.onnx", x), ac.Item("a", "ort", "m.onnx", x)], counter)
    with pytest.raises(ValueError, match="calls"):
        ac.count([ac.Item("a", "ort", "m.onnx", x)], counter, calls=0)
    with pytest.raises(TypeError, match=r"TVM executable or an onnx\.ModelProto"):
        ac.count_objects({"a": object()}, x, counter)
    bad = tmp_path / "not_a_model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RuntimeError, match="counting on emulated aarch64 failed"):
        ac.count([ac.Item("bad", "ort", str(bad), x)], counter)


@pytest.mark.slow  # counts every knob point on the emulated CPU: ~45 s
def test_tuning_on_instructions_applies_and_never_adds(counter: ac.Counter, tmp_path: Path) -> None:
    """``tune(..., cost="instructions")`` on a strided block: every knob point counted, the choice
    applied by ``compile``; the tuned build executes no more instructions than the default one
    (the choice is the count's minimum) and both match the reference. A second run counts nothing."""
    from dcgraph.backends.tvm import compiler
    from dcgraph.backends.tvm.remote.arm_server import arm_target
    from dcgraph.backends.tvm.tuning import tune
    from dcgraph.bench.op_level import tvm_module
    from dcgraph.bench.shapes import OpShape

    s = OpShape("t", "test", 16, 32, 14, 3, 2, 1, "relu")
    t = s.tensors(1)
    db = tmp_path / "db"
    report = tune(tvm_module("fused", s, t), "arm", None, db=str(db), cost="instructions", convert=False,
                  fuse_plain=False, progress=False)
    conv = next(r for r in report.tasks if r.name.startswith("dc_conv"))
    assert conv.trials_run == conv.budget > 1 and conv.wrong_results == 0
    assert conv.best_ms <= conv.default_ms
    again = tune(tvm_module("fused", s, t), "arm", None, db=str(db), cost="instructions", convert=False,
                 fuse_plain=False, progress=False)
    assert again.trials_run == 0
    builds = {kind: compiler.compile(tvm_module("fused", s, t), arm_target(), convert=False, fuse_plain=False,
                                     database=str(db) if kind == "tuned" else None, shipped=False).executable
              for kind in ("default", "tuned")}
    outputs: dict[str, np.ndarray] = {}
    got = ac.count_objects(builds, [t["x"].numpy()], counter, outputs=outputs)
    d = {k: v.double() for k, v in t.items()}
    want = R.conv_deep_control(d["x"], d["weight"], None, d["a"], d["g"], d["b"], 2, 1, act="relu").numpy()
    for kind in builds:
        assert np.abs(outputs[kind] - want).max() <= 1e-4 * np.abs(want).max(), kind
    assert got["tuned"].total <= got["default"].total * 1.002
    if conv.kept == "tuned":
        assert got["tuned"].total < got["default"].total


ASM = """\
	.type	k_compute_,@function
k_compute_:
.LBB0_1:
	mov	x1, xzr
.LBB0_2:
	ldr	q0, [x0]
	fmla	v1.4s, v0.4s, v2.s[0]
	fmla	v3.4s, v0.4s, v2.s[1]
	add	x1, x1, #1
	cmp	x1, #8
	b.ne	.LBB0_2
	fadd	v4.4s, v1.4s, v3.4s
	subs	x2, x2, #1
	b.ne	.LBB0_1
.LBB0_3:
	fmla	v5.4s, v5.4s, v6.4s
	fmul	v5.4s, v5.4s, v6.4s
	fadd	v5.4s, v5.4s, v6.4s
	fmax	v5.4s, v5.4s, v6.4s
	fmin	v5.4s, v5.4s, v6.4s
	str	q5, [x3], #16
	cbnz	x4, .LBB0_3
	ret
"""


def test_hot_loop_is_the_innermost_dense_one() -> None:
    from dcgraph.backends.tvm.remote import arm_mca

    found = arm_mca.loops(ASM)
    assert [lp.label for lp in found] == [".LBB0_2", ".LBB0_3"]  # the outer .LBB0_1 contains .LBB0_2
    hot = arm_mca.hottest_loop(ASM)
    assert hot is not None and hot.label == ".LBB0_2" and hot.fmas == 2 and len(hot.body) == 6
    if arm_mca.mca_tool() is None:
        pytest.skip("llvm-mca is not installed")
    est = arm_mca.mca(hot, "cortex-a57")
    # two FMAs per iteration, at most one 128-bit FMLA per cycle on the A57 model
    assert est["cycles_per_iteration"] >= 2 and 0 < est["fmas_per_cycle"] <= 1.0


@pytest.mark.slow  # the suite's ARM level on one block: ~25 s
def test_bench_arm_level_one_block(counter: ac.Counter) -> None:
    """``dcgraph bench arm`` on one small block: every row checked against the reference and counted,
    ratios to the floor (ORT's conv alone), the hot loop estimated."""
    from dcgraph.bench import arm_level
    from dcgraph.bench.harness import OK

    data = arm_level.run(shapes=["mbv2.dw_s2"], models=[], write=False, progress=False)
    (case,) = data["cases"]
    rows = case["rows"]
    assert set(rows) == {"ort_conv", "ort_plain", "tvm_fused"}
    assert all(r["status"] == OK for r in rows.values()), rows
    assert rows["ort_conv"]["vs_floor"] == 1.0
    assert case["dcgraph_vs_floor"] == rows["tvm_fused"]["instructions"] / rows["ort_conv"]["instructions"]
    assert "mbv2.dw_s2" in data["markdown"] and "op" in data["summary"]
