"""reconviz.onnx: export and verify in onnxruntime, and direct reconstruction of ONNX graphs.

Tolerances (docs/onnx.md): onnxruntime runs float32, so every ONNX number is held
to the contract's float32 tolerance F32 = 1e-4 relative (|a - b| <= F32 max(1, |b|));
W, whose entries are much smaller than 1, is compared relative to max |W|.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import archs
import reconviz as rv
from reconviz.errors import InputError, ReconvizError, UnsupportedOperationError
from reconviz.onnx import ORIGINAL_ORT, RECONSTRUCTED_ORT, UnsupportedGraphError
from reconviz.verify import ORIGINAL, RECONSTRUCTED

F32 = rv.tolerance_for(torch.float32)
W_REL = 1e-5  # measured <= 1e-6 (docs/onnx.md); the basis scale is what makes W this accurate
EXPORTABLE = list(archs.CLASSIC)  # alexnet's adaptive pool exports through the torch.export-based exporter only


def ort_run(model, x):
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else open(model, "rb").read()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})[0]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


def w_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def nets():
    """name -> (model, x with 2 probes, float64 PyTorch reconstruction, exported ModelProto or None)."""
    out = {}
    for i, name in enumerate(archs.CLASSIC):
        model = archs.classic(name, seed=i)
        x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(i))
        proto, _ = rv.onnx.export_torch(model, x[:1].numpy())
        out[name] = (model, x, rv.reconstruct(model, x), proto)
    return out


# --------------------------------------------------------------------------
# 1. Export and verify in onnxruntime
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(archs.CLASSIC))
def test_round_trip_to_onnx(nets, name, tmp_path):
    model, x, rec, _ = nets[name]
    path = rec.to_onnx(tmp_path / "rec.onnx")
    saved = onnx.load(path)
    onnx.checker.check_model(saved)
    inp = saved.graph.input[0]
    assert inp.name == "input" and saved.ir_version <= 13
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", *rec.sample_shape]
    assert {n.op_type for n in saved.graph.node} == {"Reshape", "MatMul", "Add"}  # 2 probes in one graph
    # r * N inputs: the probes and two points nearby; input i uses probe i % N
    near = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    xs = torch.cat([x, near]).double()
    got = ort_run(saved, xs)
    assert rel(got, rec(xs)) <= F32
    with torch.no_grad():
        assert rel(got[:2], copy.deepcopy(model).double()(x.double())) <= F32
    # one probe: a plain Gemm for any batch size
    one = onnx.load(rec.to_onnx(tmp_path / "p1.onnx", probe=1))
    assert [n.op_type for n in one.graph.node] == ["Flatten", "Gemm"]
    three = x[1:].repeat(3, 1, 1, 1)
    expected = (rec.weight[1].flatten(1) @ three.double().flatten(1).T).T + rec.bias[1]
    assert rel(ort_run(one, three), expected) <= F32
    assert json.loads(one.metadata_props[1].value) == [1]


def test_export_float64_and_options(nets, tmp_path):
    _, x, rec, _ = nets["lenet"]
    path = rec.to_onnx(tmp_path / "d.onnx", dtype="float64", probe=0, input_name="image", output_name="scores")
    m = onnx.load(path)
    assert m.graph.input[0].name == "image" and m.graph.output[0].name == "scores"
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x[:1].double().numpy()})[0]
    assert rel(got, rec.logits[:1]) <= 1e-12  # a float64 Gemm: the float64 tolerance holds
    with pytest.raises(InputError, match="probe must be"):
        rec.to_onnx(tmp_path / "x.onnx", probe=2)
    with pytest.raises(InputError, match="dtype"):
        rec.to_onnx(tmp_path / "x.onnx", dtype="int8")
    assert not (tmp_path / "x.onnx").exists()


def test_verify_both_and_onnxruntime(nets, capfd):
    model, x, rec, _ = nets["lenet"]
    both = rv.verify(model, rec, backend="both")
    assert set(both.columns) == {ORIGINAL, RECONSTRUCTED, ORIGINAL_ORT, RECONSTRUCTED_ORT}
    pairs = {(c.a, c.b): c for c in both.comparisons}
    assert set(pairs) == {(RECONSTRUCTED, ORIGINAL), (RECONSTRUCTED_ORT, ORIGINAL_ORT),
                          (RECONSTRUCTED_ORT, RECONSTRUCTED), (ORIGINAL_ORT, ORIGINAL),
                          (RECONSTRUCTED_ORT, ORIGINAL)}
    assert both.ok and pairs[(RECONSTRUCTED, ORIGINAL)].tolerance == 1e-9
    for key, c in pairs.items():
        if RECONSTRUCTED_ORT in key or ORIGINAL_ORT in key:
            assert c.tolerance == F32 and c.max_rel_error <= F32
    text = str(both)
    assert "original (onnxruntime)" in text and "float32" in text
    ort_only = rv.verify(model, rec, backend="onnxruntime", radius=False)
    assert [(c.a, c.b) for c in ort_only.comparisons[1:]] == [(RECONSTRUCTED_ORT, ORIGINAL_ORT),
                                                             (RECONSTRUCTED_ORT, RECONSTRUCTED)]
    assert ort_only.ok
    # a wrong reconstruction fails in onnxruntime too
    bad = copy.deepcopy(rec)
    bad.bias = bad.bias + 0.01
    assert not rv.verify(model, bad, backend="onnxruntime", radius=False, jacobian=False).ok


def test_verify_when_the_model_cannot_be_exported(nets, capfd, monkeypatch):
    model, x, rec, proto = nets["alexnet"]
    # the TorchScript exporter cannot export its adaptive pool (7 -> 2); the torch.export-based one can
    assert {p.key: p.value for p in proto.metadata_props}["reconviz.exporter"] == "dynamo"

    real = torch.onnx.export

    def no_dynamo(*a, **k):
        if k.get("dynamo"):
            raise RuntimeError("torch.export failed")
        return real(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)  # the TorchScript exporter fails for real
    report = rv.verify(model, rec, backend="both", radius=False)
    assert ORIGINAL_ORT not in report.columns and RECONSTRUCTED_ORT in report.columns
    assert sum("cannot be exported" in n and "adaptive_avg_pool2d" in n for n in report.notes) == 1
    assert {(c.a, c.b) for c in report.comparisons[1:]} == {(RECONSTRUCTED_ORT, RECONSTRUCTED),
                                                            (RECONSTRUCTED_ORT, ORIGINAL)}
    assert report.ok
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err  # the exporter's dump is silenced


# --------------------------------------------------------------------------
# 2. Reconstruct ONNX graphs directly
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_path_equals_torch_path(nets, name):
    model, x, ref, proto = nets[name]
    before = proto.SerializeToString()
    rec = rv.onnx.reconstruct(proto, x)
    assert proto.SerializeToString() == before  # the user's ModelProto is not modified
    m = rec.meta
    assert (m["backend"], m["dtype"], m["exactness"], m["tolerance"]) == ("onnxruntime", "float32", "region-exact", F32)
    assert rec.weight.dtype == torch.float32 and rec.weight.shape == ref.weight.shape
    assert m["max_rel_error"] <= F32
    assert w_rel(rec.weight, ref.weight) <= W_REL
    assert rel(rec.bias, ref.bias) <= F32
    assert rel(rec.logits, ref.logits) <= F32
    assert torch.equal(rec.predicted, ref.predicted)
    assert m["gates"]["Relu"] >= 4 and m["gates"].get("MaxPool", 0) + m["gates"].get("ReduceMax", 0) >= 1
    assert [c["name"] for c in m["self_checks"]] == ["affinity", "region"] and m["self_checks"][0]["passed"]


def test_bases_chunks_classes_agree(nets):
    _, x, ref, proto = nets["lenet"]
    base = rv.onnx.reconstruct(proto, x, classes=[7, 2], chunk_size=37)
    assert base.classes.tolist() == [7, 2] and base.meta["chunk_size"] == 37
    for basis in ("hadamard", "random"):
        rec = rv.onnx.reconstruct(proto, x, classes=[7, 2], basis=basis, seed=3)
        assert rec.meta["basis"] == basis
        assert w_rel(rec.weight, ref.weight[:, [7, 2]]) <= W_REL
    # without the basis scale, float32 cancellation in g(q) - b costs accuracy (docs/onnx.md)
    unscaled = rv.onnx.reconstruct(proto, x, classes=[7, 2], basis="hadamard", scale=1.0)
    assert w_rel(unscaled.weight, ref.weight[:, [7, 2]]) > w_rel(base.weight, ref.weight[:, [7, 2]])


def test_saved_onnx_reconstruction_round_trips(nets, tmp_path):
    model, x, ref, proto = nets["resnet"]
    path = tmp_path / "resnet.onnx"
    path.write_bytes(proto.SerializeToString())
    rec = rv.onnx.reconstruct(str(path), x)
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "r.npz"))
    assert loaded.meta["backend"] == "onnxruntime" and torch.equal(loaded.weight, rec.weight)
    assert rv.verify(model, loaded, backend="onnxruntime", radius=False).ok
    assert rel(ort_run(onnx.load(loaded.to_onnx(tmp_path / "affine.onnx")), x), ort_run(proto, x)) <= F32


# hand-written graphs in the style other frameworks emit ---------------------


def _init(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class PaddleTwin(nn.Module):
    """Conv-BN-ReLU6-AvgPool-Conv-PReLU-MaxPool(3, 2, 1)-Flatten-Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3, padding=1)
        self.act, self.fc = nn.PReLU(8), nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = F.avg_pool2d(F.relu6(self.bn(self.c1(x))), 2)
        return self.fc(F.max_pool2d(self.act(self.c2(x)), 3, 2, 1).flatten(1))


def paddle_style(final="Softmax"):
    """A graph as Paddle2ONNX writes it: Clip(0, 6) for ReLU6 (bounds as inputs), Gemm, a final Softmax."""
    rng = np.random.default_rng(0)
    twin = PaddleTwin().eval()
    p = {
        "w1": _init(rng, 6, 3, 3, 3, scale=1.5), "b1": _init(rng, 6), "g": _init(rng, 6) + 1, "beta": _init(rng, 6),
        "mean": _init(rng, 6, scale=0.1), "var": np.abs(_init(rng, 6)) + 0.5, "w2": _init(rng, 8, 6, 3, 3),
        "b2": _init(rng, 8), "slope": np.linspace(0.05, 0.4, 8, dtype=np.float32).reshape(8, 1, 1),
        "wf": _init(rng, 5, 32), "bf": _init(rng, 5), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
    }
    with torch.no_grad():
        for mod, names in ((twin.c1, ("w1", "b1")), (twin.c2, ("w2", "b2")), (twin.fc, ("wf", "bf"))):
            mod.weight.copy_(torch.from_numpy(p[names[0]]))
            mod.bias.copy_(torch.from_numpy(p[names[1]]))
        twin.bn.weight.copy_(torch.from_numpy(p["g"]))
        twin.bn.bias.copy_(torch.from_numpy(p["beta"]))
        twin.bn.running_mean.copy_(torch.from_numpy(p["mean"]))
        twin.bn.running_var.copy_(torch.from_numpy(p["var"]))
        twin.act.weight.copy_(torch.from_numpy(p["slope"].reshape(-1)))
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv2d_0"),
        n("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-5, name="batch_norm_0"),
        n("Clip", ["bn", "lo", "hi"], ["r6"], name="relu6_0"),
        n("AveragePool", ["r6"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="pool2d_0"),
        n("Conv", ["ap", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2d_1"),
        n("PRelu", ["c2", "slope"], ["pr"], name="prelu_0"),
        n("MaxPool", ["pr"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool2d_1"),
        n("Flatten", ["mp"], ["fl"], axis=1, name="flatten_0"),
        n("Gemm", ["fl", "wf", "bf"], ["logits"], transB=1, name="linear_0"),
        n(final, ["logits"], ["prob"], axis=1, name="softmax_0"),
    ]
    graph = helper.make_graph(
        nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in p.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model, twin


class KerasTwin(nn.Module):
    """NHWC input: permute, conv, ReLU, max-pool, permute back, dense + LeakyReLU, dense."""

    def __init__(self):
        super().__init__()
        self.conv, self.d1, self.d2 = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 12), nn.Linear(12, 6)

    def forward(self, x):
        z = F.max_pool2d(F.relu(self.conv(x.permute(0, 3, 1, 2))), 2)
        return self.d2(F.leaky_relu(self.d1(z.permute(0, 2, 3, 1).reshape(len(x), -1)), 0.2))


def keras_style(batch="unk__0"):
    """A graph as tf2onnx writes a Keras model: NHWC input, Transpose around the conv part,
    Reshape to (batch, -1), MatMul + Add dense layers, LeakyRelu, a final Softmax."""
    torch.manual_seed(1)
    twin = KerasTwin().eval()
    t = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
    inits = {
        "k": t["conv.weight"], "kb": t["conv.bias"], "w1": np.ascontiguousarray(t["d1.weight"].T), "b1": t["d1.bias"],
        "w2": np.ascontiguousarray(t["d2.weight"].T), "b2": t["d2.bias"],
        "shape": np.array([-1 if batch == "unk__0" else batch, 64], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2], name="conv2d/Conv2D__6"),
        n("Conv", ["nchw", "k", "kb"], ["conv"], pads=[1, 1, 1, 1], name="conv2d/Conv2D"),
        n("Relu", ["conv"], ["relu"], name="conv2d/Relu"),
        n("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="max_pooling2d/MaxPool"),
        n("Transpose", ["pool"], ["nhwc"], perm=[0, 2, 3, 1], name="max_pooling2d/MaxPool__12"),
        n("Reshape", ["nhwc", "shape"], ["flat"], name="flatten/Reshape"),
        n("MatMul", ["flat", "w1"], ["mm1"], name="dense/MatMul"),
        n("Add", ["mm1", "b1"], ["d1"], name="dense/BiasAdd"),
        n("LeakyRelu", ["d1"], ["lr"], alpha=0.2, name="leaky_re_lu/LeakyRelu"),
        n("MatMul", ["lr", "w2"], ["mm2"], name="dense_1/MatMul"),
        n("Add", ["mm2", "b2"], ["d2"], name="dense_1/BiasAdd"),
        n("Softmax", ["d2"], ["dense_1"], axis=-1, name="dense_1/Softmax"),
    ]
    graph = helper.make_graph(
        nodes, "keras", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, 8, 8, 3])],
        [helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, [batch, 6])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    return model, twin


def test_paddle_style_clip_relu6(tmp_path):
    model, twin = paddle_style()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rec = rv.onnx.reconstruct(model, x)
    ref = rv.reconstruct(twin, x)
    assert any("Softmax" in note and "'logits'" in note for note in rec.meta["notes"])
    assert rec.meta["gates"] == {"Clip": 1, "PRelu": 1, "MaxPool": 1}
    lin = rv.onnx.linearize(model, x)
    clip = next(p for p in lin.priors if p.op == "Clip")
    assert "offset" in clip.tensors and (clip.tensors["offset"] == 6).any()  # the upper bound is active
    assert (clip.tensors["slope"] == 0).any() and (clip.tensors["slope"] == 1).any()
    assert w_rel(rec.weight, ref.weight) <= W_REL
    assert rel(rec.bias, ref.bias) <= F32 and rel(rec.logits, ref.logits) <= F32
    # the exported affine model equals the graph's logits (the Softmax input) in onnxruntime
    logits = rv.onnx.run_model(model, x, "logits")
    assert rel(ort_run(onnx.load(rec.to_onnx(tmp_path / "p.onnx")), x), logits) <= F32
    with pytest.raises(UnsupportedGraphError, match="softmax_0"):
        rv.onnx.reconstruct(model, x, logits="output")
    log_model, _ = paddle_style("LogSoftmax")
    assert any("LogSoftmax" in n for n in rv.onnx.reconstruct(log_model, x[:1]).meta["notes"])


def test_keras_style_nhwc_transpose():
    model, twin = keras_style()
    x = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    rec = rv.onnx.reconstruct(model, x)
    ref = rv.reconstruct(twin, x)
    assert rec.sample_shape == (8, 8, 3) and rec.meta["input_name"] == "input_1"
    assert rec.meta["gates"] == {"Relu": 1, "MaxPool": 1, "LeakyRelu": 1}
    assert w_rel(rec.weight, ref.weight) <= W_REL
    assert rel(rec.bias, ref.bias) <= F32 and rel(rec.logits, ref.logits) <= F32


def test_fixed_batch_is_made_dynamic():
    model, twin = keras_style(batch=1)
    x = torch.randn(3, 8, 8, 3, generator=torch.Generator().manual_seed(2))
    rec = rv.onnx.reconstruct(model, x)
    assert any("fixed at 1" in n for n in rec.meta["notes"])
    assert w_rel(rec.weight, rv.reconstruct(twin, x).weight) <= W_REL


def test_linearized_graph_is_the_rewritten_structure(nets, tmp_path):
    model, x, ref, proto = nets["lenet"]
    lin = rv.onnx.linearize(proto, x)
    path = lin.save(tmp_path / "lin.onnx")
    saved = onnx.load(path)
    onnx.checker.check_model(saved)
    ops = {n.op_type for n in saved.graph.node}
    assert "Relu" not in ops and "MaxPool" not in ops and {"Mul", "Gather"} <= ops
    assert rel(ort_run(saved, x), ref.logits) <= F32
    # the rewritten network is affine everywhere: far outside the linear region it is
    # W x + b, and the original network is not
    far = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    affine = ref(far.double())
    assert rel(ort_run(saved, far), affine) <= F32
    assert rel(ort_run(proto, far), affine) > 1e-2
    # from a PyTorch model directly (exported first)
    path2 = rv.onnx.linearized_to_onnx(model, x, tmp_path / "lin2.onnx")
    assert rel(ort_run(onnx.load(path2), far), affine) <= F32


def test_global_max_pool_and_relu_on_the_input():
    rng = np.random.default_rng(3)
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["r"]), n("Conv", ["r", "w"], ["c"], pads=[1, 1, 1, 1]),
             n("GlobalMaxPool", ["c"], ["g"]), n("Flatten", ["g"], ["f"]), n("MatMul", ["f", "m"], ["y"])]
    inits = {"w": _init(rng, 4, 2, 3, 3), "m": _init(rng, 4, 3)}
    graph = helper.make_graph(nodes, "gmp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.from_numpy(inits["w"]))
            self.register_buffer("m", torch.from_numpy(inits["m"]))

        def forward(self, x):
            return F.adaptive_max_pool2d(F.conv2d(F.relu(x), self.w, padding=1), 1).flatten(1) @ self.m

    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    rec = rv.onnx.reconstruct(model, x)
    assert rec.meta["gates"] == {"Relu": 1, "GlobalMaxPool": 1}
    assert w_rel(rec.weight, rv.reconstruct(Twin().eval(), x).weight) <= W_REL


def test_rv_reconstruct_takes_an_onnx_model(nets, tmp_path):
    """rv.reconstruct(ModelProto or .onnx path) is rv.onnx.reconstruct: the same W, b, exact at the probes."""
    name = EXPORTABLE[0]
    model, x, torch_rec, proto = nets[name]
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    direct = rv.onnx.reconstruct(proto, x, classes=[0, 2], seed=1)
    for source in (proto, path, str(path)):
        rec = rv.reconstruct(source, x, classes=[0, 2], seed=1)
        assert rec.meta["backend"] == "onnxruntime" and rec.meta["method"] == "basis"
        assert torch.equal(rec.weight, direct.weight) and torch.equal(rec.bias, direct.bias)
        assert rec.meta["max_rel_error"] <= F32 and rel(rec(x), ort_run(proto, x)[:, [0, 2]]) <= F32
        assert w_rel(rec.weight, torch_rec.weight[:, [0, 2]]) <= W_REL
        assert rel(rec.bias, torch_rec.bias[:, [0, 2]]) <= F32
    for bad in ({"method": "adjoint"}, {"dtype": torch.float16}, {"output": 0}, {"keep_hooks": True}):
        with pytest.raises(InputError, match="ONNX model"):
            rv.reconstruct(proto, x, **bad)
    with pytest.raises(InputError, match="not found"):
        rv.reconstruct(tmp_path / "missing.onnx", x)
    for other in (str(tmp_path / "model.pt"), proto.SerializeToString(), 42):
        with pytest.raises(InputError, match="must be a torch.nn.Module"):
            rv.reconstruct(other, x)


# errors -----------------------------------------------------------------------


def _graph(nodes, inits=None, inputs=None, opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def test_unsupported_ops_are_listed_before_any_run(monkeypatch):
    n = helper.make_node
    model = _graph([
        n("Exp", ["x"], ["s"], name="gate"), n("Mul", ["s", "x"], ["m"], name="square"),
        n("Softmax", ["m"], ["p"], name="attention"), n("Relu", ["p"], ["r"], name="ok"),
        n("MatMul", ["r", "w"], ["y"], name="head"),
    ], {"w": np.eye(4, dtype=np.float32)})

    def no_run(*a, **k):
        raise AssertionError("onnxruntime ran before the unsupported ops were reported")

    monkeypatch.setattr("reconviz.onnx.probe.session", no_run)
    with pytest.raises(UnsupportedGraphError) as info:
        rv.onnx.reconstruct(model, torch.randn(1, 4))
    e = info.value
    assert isinstance(e, UnsupportedOperationError) and isinstance(e, ReconvizError)
    assert [(name, op) for name, op, _ in e.nodes] == [("gate", "Exp"), ("square", "Mul"), ("attention", "Softmax")]
    text = str(e)
    assert "smooth non-linearity" in text and "bilinear" in text and "logits='<tensor name>'" in text


def test_gate_parameters_must_be_constants():
    n = helper.make_node
    model = _graph([n("Neg", ["x"], ["hi"]), n("Clip", ["x", "", "hi"], ["c"], name="clip"),
                    n("Unsqueeze", ["c", "ax"], ["c3"]),
                    n("MaxPool", ["c3"], ["p"], kernel_shape=[1], storage_order=1, name="pool"),
                    n("Squeeze", ["p", "ax"], ["y"])],
                   {"ax": np.array([2], np.int64)})
    with pytest.raises(UnsupportedGraphError) as info:
        rv.onnx.reconstruct(model, torch.randn(1, 4))
    assert {name for name, _, _ in info.value.nodes} == {"clip", "pool"}
    assert "storage_order" in str(info.value) and "depend on the input" in str(info.value)


def test_malformed_graphs_and_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        rv.onnx.reconstruct(tmp_path / "missing.onnx", torch.randn(1, 4))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(InputError, match="not an ONNX model"):
        rv.onnx.reconstruct(junk, torch.randn(1, 4))
    dangling = _graph([helper.make_node("Relu", ["nowhere"], ["y"])])
    with pytest.raises(InputError, match="not a valid ONNX model"):
        rv.onnx.reconstruct(dangling, torch.randn(1, 4))
    ok = _graph([helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(InputError, match=r"shape \(\?, 4\)"):
        rv.onnx.reconstruct(ok, torch.randn(1, 5))
    with pytest.raises(InputError, match="NaN"):
        rv.onnx.reconstruct(ok, torch.full((1, 4), float("nan")))
    two = _graph([helper.make_node("Add", ["x", "z"], ["y"])], inputs=[
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(InputError, match="2 inputs"):
        rv.onnx.reconstruct(two, torch.randn(1, 4))
    ints = _graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                  inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])])
    with pytest.raises(InputError, match="float32"):
        rv.onnx.reconstruct(ints, torch.randn(1, 4))
    with pytest.raises(InputError, match="classes"):
        rv.onnx.reconstruct(ok, torch.randn(1, 4), classes=[4])
    with pytest.raises(InputError, match="unknown basis"):
        rv.onnx.reconstruct(ok, torch.randn(1, 4), basis="fourier")
    with pytest.raises(InputError, match="logits="):
        rv.onnx.reconstruct(ok, torch.randn(1, 4), logits="nope")
    rec = rv.onnx.reconstruct(ok, torch.tensor([[1.0, -2.0, 3.0, -0.5]]))
    assert torch.equal(rec.weight[0], torch.diag(torch.tensor([1.0, 0, 1, 0])))


def test_cli_reconstructs_an_onnx_file_ending_in_softmax(tmp_path, capsys):
    from reconviz.cli import main

    model, _ = paddle_style()
    path = tmp_path / "paddle.onnx"
    path.write_bytes(model.SerializeToString())
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    code = main(["reconstruct", str(path), str(tmp_path / "x.npy"), "--no-figures", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ok"] and any("Softmax" in n for n in report["notes"])
    assert report["comparisons"][0]["max_rel_error"] <= F32


# --------------------------------------------------------------------------
# 3. One exporter, streaming W, max-pool ties, notes
# --------------------------------------------------------------------------


def test_export_torch_names_outputs_and_serves_the_cli(nets, tmp_path, monkeypatch):
    from reconviz.cli import LoadedModel, UsageError, _onnx_file

    model, x, _, proto = nets["lenet"]
    assert [o.name for o in proto.graph.output] == ["output0"]  # the default names
    assert rv.onnx.reconstruct(proto, x).meta["logits_tensor"] == "output0"
    named, _ = rv.onnx.export_torch(model, x[:1].numpy(), ["logits"])
    assert [o.name for o in named.graph.output] == ["logits"]
    # the CLI exports TorchScript through export_torch: input "input", output "logits", dynamic batch
    script = torch.jit.script(model).eval()
    path = _onnx_file(LoadedModel("torchscript", "m.pt", module=script), x.double(), tmp_path)
    saved = onnx.load(path)
    assert [(v.name, v.type.tensor_type.shape.dim[0].dim_param) for v in (*saved.graph.input, *saved.graph.output)] \
        == [("input", "batch"), ("logits", "batch")]
    exporter = {p.key: p.value for p in saved.metadata_props}["reconviz.exporter"]
    assert exporter == "torchscript"  # torch.export cannot take a ScriptModule: the fallback exported it
    assert {p.key: p.value for p in named.metadata_props}["reconviz.exporter"] == "dynamo"
    assert rel(ort_run(saved, x), ort_run(named, x)) <= F32
    assert rv.onnx.reconstruct(str(path), x).meta["logits_tensor"] == "logits"
    # an export failure: the CLI's message quotes the exporter's own exception
    assert rv.onnx.export_torch(model, x[:1].numpy(), ["logits"])[1] is None

    def fail(*a, **k):
        raise RuntimeError("no symbolic\n  for  aten::foo")

    monkeypatch.setattr(torch.onnx, "export", fail)
    assert rv.onnx.export_torch(model, x[:1].numpy())[1] == (
        "torch.onnx.export failed: RuntimeError: no symbolic for aten::foo "
        "(the torch.export-based exporter: RuntimeError: no symbolic for aten::foo)")
    with pytest.raises(UsageError, match=r"^the TorchScript model could not be exported to ONNX \(no symbolic for "
                                         r"aten::foo\); TorchScript runs outside Python"):
        _onnx_file(LoadedModel("torchscript", "m.pt", module=script), x, tmp_path / "again")


@pytest.mark.parametrize("basis", ["hadamard", "random"])
def test_block_products_from_uneven_chunks(nets, basis):
    """Blocks assembled from chunks of 7 columns (the last one short): one product per block."""
    _, x, ref, proto = nets["lenet"]
    rec = rv.onnx.reconstruct(proto, x, basis=basis, chunk_size=7, seed=1)
    assert rec.meta["chunk_size"] == 7
    assert w_rel(rec.weight, ref.weight) <= W_REL and rel(rec.bias, ref.bias) <= F32


def test_w_streams_to_disk_like_the_torch_path(nets, tmp_path):
    _, x, _, proto = nets["lenet"]
    for basis in ("random", "identity", "hadamard"):
        mem = rv.onnx.reconstruct(proto, x, basis=basis, chunk_size=16)
        small = rv.onnx.reconstruct(proto, x, basis=basis, chunk_size=16, max_memory=100_000)  # W is 62,720 bytes
        assert not mem.streamed and small.streamed and small.meta["memory"]["streamed"]
        assert small.meta["memory"]["weight_bytes"] == mem.weight.numel() * 4 == 62_720
        assert torch.equal(small.weight, mem.weight) and torch.equal(small.bias, mem.bias)
        assert torch.equal(small(x), mem(x)) and small.meta["max_rel_error"] == mem.meta["max_rel_error"]
    auto = rv.onnx.reconstruct(proto, x, max_memory=100_000)  # batches sized to the budget's rest
    assert auto.meta["chunk_size"] < rv.onnx.reconstruct(proto, x).meta["chunk_size"]
    npy = tmp_path / "W.npy"
    out = rv.onnx.reconstruct(proto, x, basis="hadamard", chunk_size=16, out=npy)  # as the last `mem`
    assert out.streamed and out.meta["weight_file"] == str(npy)
    assert np.array_equal(np.load(npy), mem.weight.numpy())
    loaded = rv.Reconstruction.load(out.save(tmp_path / "r.npz"))
    assert torch.equal(loaded.weight, mem.weight)
    with pytest.raises(InputError, match="max_memory"):
        rv.onnx.reconstruct(proto, x, max_memory=-1)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                                  nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))])
def test_max_pool_ties_counted_like_the_torch_path(pool):
    torch.manual_seed(0)
    model = nn.Sequential(pool, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randint(0, 3, (2, 2, 7, 7)).float()  # few distinct values: many windows with two maxima
    model(x)
    model.eval()
    proto, why = rv.onnx.export_torch(model, x[:1].numpy())
    assert proto is not None, why
    ties = rv.reconstruct(model, x).meta["ties"]
    assert ties > 0 and rv.onnx.reconstruct(proto, x).meta["ties"] == ties
    assert rv.onnx.reconstruct(proto, torch.randn(2, 2, 7, 7)).meta["ties"] == 0


@pytest.mark.parametrize("kernel, pool, ties", [(4, {"auto_pad": "SAME_UPPER"}, 1), (4, {"auto_pad": "SAME_LOWER"}, 2),
                                                 (4, {"auto_pad": "VALID"}, 0),
                                                 (3, {"pads": [0, 1], "strides": [2]}, 1)])
def test_max_pool_ties_with_auto_pad(kernel, pool, ties):
    """x = [1, 1, 0, 2]. Kernel 4, SAME (3 padded, the odd one at the end or the start):
    windows x[0:3], x[0:4], x[1:4], x[2:4] (one tie) or x[0:2], x[0:3], x[0:4], x[1:4]
    (two); VALID: x[0:4] (none). Kernel 3, stride 2, pads (0, 1): x[0:3], x[2:4] (one)."""
    n = helper.make_node
    nodes = [n("MaxPool", ["x"], ["p"], kernel_shape=[kernel], **pool), n("Flatten", ["p"], ["f"]),
             n("ReduceSum", ["f", "axes"], ["y"], keepdims=1)]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    rec = rv.onnx.reconstruct(model, torch.tensor([[[1.0, 1.0, 0.0, 2.0]]]))
    assert rec.meta["ties"] == ties


def test_verify_reports_the_reconstructions_notes():
    model, twin = paddle_style()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rec = rv.onnx.reconstruct(model, x)
    report = rv.verify(twin, rec, radius=False)
    assert report.ok and rec.meta["notes"] and report.notes[:len(rec.meta["notes"])] == rec.meta["notes"]
    assert "ends in Softmax" in str(report) and report.to_dict()["notes"] == report.notes


def test_prepare_maps_the_producers_once(monkeypatch, nets):
    import reconviz.onnx.graph as graph

    calls = []
    real = graph._producers
    monkeypatch.setattr(graph, "_producers", lambda g: calls.append(1) or real(g))
    model, _ = paddle_style()
    prep = graph.prepare(model, (1, 3, 8, 8))
    assert prep.logits_name == "logits" and len(calls) == 1
    assert "prob" not in {o for node in prep.model.graph.node for o in node.output}  # the Softmax was pruned
