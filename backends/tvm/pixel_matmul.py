"""Convs whose input is one pixel per sample, legalized as matmuls (CPU targets).

``conv2d(x, W)`` with ``x`` of shape ``(N, C, 1, 1)``, a ``1x1`` kernel, no padding and one
group is ``y[n, o, 0, 0] = sum_c x[n, c, 0, 0] W[o, c]``: a matmul, with the weight transposed
once at compile time and packed in panels of output channels (:mod:`.packed_matmul`, a
constant), so a vector of output channels is contiguous.
Squeeze-Excitation gates (two such convs on the globally pooled map of every MBConv block of
EfficientNet) and classifiers written as a 1x1 conv (pytorchcv's MobileNetV2) are this case.
TVM's legalization gave them the conv schedule, which vectorises along output columns (there is
one); as a matmul they get the matmul rule (:func:`.schedules.cpu_other_ops.schedule_matmul`:
output channels in vector registers). The output keeps its 4-d shape, so the bias add and the
activation after it still fuse into the kernel (a reshape between them would stop FuseOps, and
the activation would be recomputed per pixel by the gate's multiply).
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from .exprs import constant_value, static_shape
from .packed_matmul import pack_weight, packed_matmul, panel_width

__all__ = ["is_pixel_conv", "legalize_conv2d"]


def is_pixel_conv(call: relax.Call) -> bool:
    """Whether ``call`` (a ``relax.nn.conv2d``) is a one-pixel 1x1 conv (see the module docstring)."""
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or "NCHW")) != ("NCHW", "OIHW", "NCHW"):
        return False
    xs, ws = static_shape(call.args[0]), static_shape(call.args[1])
    if xs is None or ws is None or len(xs) != 4 or len(ws) != 4:
        return False
    if int(a.groups) != 1 or any(int(p) for p in a.padding):
        return False
    dtype = str(call.args[0].ty.dtype)
    out_dtype = str(a.out_dtype) if a.out_dtype is not None else ""
    return (xs[2:] == (1, 1) and ws[2:] == (1, 1) and out_dtype in ("", "void", dtype)
            and str(call.args[1].ty.dtype) == dtype)


def pixel_matmul(x: te.Tensor, wt: te.Tensor) -> te.Tensor:
    """``y[n, o, 0, 0] = sum_c x[n, c, 0, 0] * wt[c, o]`` (``wt`` the transposed weight)."""
    n, c = int(x.shape[0]), int(x.shape[1])
    o = int(wt.shape[1])
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute((n, o, 1, 1), lambda i, j, h, w: te.sum(x[i, rc, h, w] * wt[rc, j], axis=rc),
                      name="pixel_matmul")


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call, lanes: int = 16) -> relax.Expr:
    """``relax.nn.conv2d`` legalization: one-pixel 1x1 convs as matmuls (a constant weight in
    panels, :func:`.packed_matmul.packed_matmul`; one fed at run time transposed by a kernel of its
    own, :func:`pixel_matmul`), every other conv as TVM legalizes it."""
    if not is_pixel_conv(call):
        return tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")(bb, call)
    x, w = call.args
    o, c = static_shape(w)[:2]
    value = constant_value(w)
    if value is not None:
        width = panel_width(o, static_shape(x)[0], lanes)
        wp = relax.const(pack_weight(value.reshape(o, c).T, width), str(w.ty.dtype))
        return bb.call_te(packed_matmul, x, wp, o, True, primfunc_name_hint="pixel_matmul")
    # a weight fed at run time: transposed by a kernel of its own
    wt = bb.emit_te(lambda t: te.compute((c, o), lambda i, j: t[j, i, 0, 0], name="transpose"), w)
    return bb.call_te(pixel_matmul, x, wt, primfunc_name_hint="pixel_matmul")
