"""An ONNX model a user brings (``edgeherd build --onnx``): check it, choose the output the build evaluates, and
make that output a plain scores tensor.

Converters such as skl2onnx give a model several outputs (a label and the class probabilities), operators of
the ``ai.onnx.ml`` domain (LinearClassifier, Normalizer) and, by default, a ZipMap output: a sequence of
``{class: probability}`` maps, which no device reads as a tensor. :func:`prepare_onnx` writes a copy of the
model whose only output is the chosen scores tensor:

- the chosen output is the one named (``--output NAME``), or else the first output that holds per-class scores
  (a float tensor, or a ZipMap), preferring one whose name holds "prob" or "score";
- a ZipMap output is replaced by the tensor that feeds the ZipMap node (the same probabilities, shaped
  ``(batch, classes)``, in the order of the ZipMap's class labels);
- an output of class ids (a label-only model, or ``--output`` naming the label) is served as labels: a
  ``OneHot`` appended to the graph gives ``(batch, classes)`` scores, 1 for the predicted class, when a
  classifier operator's ``classlabels_ints`` say the ids are the dataset's classes;
- the other outputs, and the nodes only they need, are removed, so every runtime and every reader of the
  manifest sees the scores as the model's one output.

The input must be one float32 tensor with a dynamic batch dimension whose other dimensions the dataset's rows
fill; where an ``ai.onnx.ml`` operator reads the input, its weights say how many values per row it reads (a
LinearClassifier's coefficients, the highest feature a TreeEnsemble tests), which a declaration of
``(batch, ?)`` does not: the prepared model declares that count, so rows of another width are refused rather
than misread.

Everything wrong is a :class:`~toolchain.errors.ModelError` that names the file and the problem.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import ModelError

__all__ = ["ML_DOMAIN", "PreparedOnnx", "load_onnx", "prepare_onnx"]

ML_DOMAIN = "ai.onnx.ml"
#: Longest output name a manifest's TensorSpec holds.
_MAX_NAME = 128
_SCORE_WORDS = ("prob", "score")
_ZIPMAP_FIX = ('export the model again without ZipMap, e.g. skl2onnx.to_onnx(model, X, options={id(model): '
               '{"zipmap": False}})')


@dataclass(frozen=True)
class PreparedOnnx:
    """What :func:`prepare_onnx` did to the model."""

    #: The output of the prepared model (the tensor that fed the ZipMap when ``zipmap`` is set).
    output: str
    #: The output as the source model named it.
    source_output: str
    #: True when the source output was a ZipMap and the prepared model outputs its input tensor instead.
    zipmap: bool
    #: Outputs of the source model the prepared one no longer has.
    dropped: list[str] = field(default_factory=list)
    #: Operator domains other than the default ONNX one that the prepared model uses (e.g. "ai.onnx.ml").
    domains: list[str] = field(default_factory=list)
    #: The operators of those domains it uses (e.g. "TreeEnsembleClassifier"), which decide what it can become.
    operators: list[str] = field(default_factory=list)
    #: The class of each score column, as the ZipMap named them, or a label output's class ids as text (else None).
    class_labels: list[str] | None = None
    #: True when the source output gave class ids, served as one-hot scores (1 for the predicted class).
    labels: bool = False

    def notes(self) -> list[str]:
        out = []
        if self.labels:
            out.append(f"the output {self.source_output!r} gives class ids: it is served as one-hot scores "
                       f"{self.output!r} (1 for the predicted class, 0 for the others), so no confidence is known")
        if self.zipmap:
            out.append(f"the ZipMap output {self.source_output!r} was replaced by the tensor that feeds it, "
                       f"{self.output!r} (the same probabilities as a (batch, classes) tensor)")
        if self.dropped:
            out.append(f"output(s) {', '.join(map(repr, self.dropped))} removed: the bundle evaluates and serves "
                       f"{self.output!r}")
        return out


#: A file that begins with these bytes is something else, said by name.
_OTHER_FORMATS = ((b"PK\x03\x04", "a ZIP archive (a PyTorch .pt file or a zipped model?)"),
                  (b"\x89HDF", "an HDF5 file (a Keras .h5 model?)"), (b"TFL3", "a TFLite model"))


def _not_onnx(head: bytes) -> str:
    """What a file beginning with ``head`` seems to be, for the message that refuses it."""
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic) or head[4:8] == magic:
            return f"it is {what}"
    try:  # incremental: a character cut at the end of ``head`` is not a decoding error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        start = " ".join(text.split())[:40]
        return f"it holds text (it begins {start!r}), and an ONNX model is a binary protobuf file"
    return "its bytes do not parse as an ONNX protobuf (a file cut short or damaged in transfer reads so)"


def load_onnx(path: Path) -> Any:
    """The ``onnx.ModelProto`` in ``path``; :class:`ModelError` when it is not an ONNX model."""
    import onnx

    fix = "give the .onnx file an exporter wrote (torch.onnx, skl2onnx, onnxmltools)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise ModelError(f"{path} cannot run: it is not an ONNX model: the file is empty (0 bytes); {fix}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError, onnx's own errors: the file is not a model
        raise ModelError(f"{path} cannot run: it is not an ONNX model: {_not_onnx(data[:256])}; "
                         f"{fix}") from None
    if not model.ir_version or not model.HasField("graph") or not model.graph.output:
        raise ModelError(f"{path} cannot run: it is not an ONNX model: it holds no graph with inputs and outputs "
                         f"({len(data)} bytes); {fix}")
    return model


def _describe(type_proto: Any) -> str:
    from onnx import TensorProto

    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        tt = type_proto.tensor_type
        dtype = TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
        if not tt.HasField("shape"):
            return f"{dtype} tensor"
        dims = ["batch" if i == 0 and not d.dim_value else (str(d.dim_value) if d.dim_value else "?")
                for i, d in enumerate(tt.shape.dim)]
        return f"{dtype} tensor ({', '.join(dims)}{',' if len(dims) == 1 else ''})"
    if kind == "sequence_type" and type_proto.sequence_type.elem_type.WhichOneof("value") == "map_type":
        return "sequence of maps"
    return {"sequence_type": "sequence", "map_type": "map", "optional_type": "optional"}.get(str(kind), str(kind))


def _is_scores(type_proto: Any) -> bool:
    """A float tensor of rank 2 (or of unknown rank): per-class scores for a batch."""
    from onnx import TensorProto

    if type_proto.WhichOneof("value") != "tensor_type":
        return False
    tt = type_proto.tensor_type
    if tt.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        return False
    return not tt.HasField("shape") or len(tt.shape.dim) == 2


def _is_labels(type_proto: Any) -> bool:
    """An integer tensor of one class id per row: (batch,) or (batch, 1)."""
    from onnx import TensorProto

    if type_proto.WhichOneof("value") != "tensor_type":
        return False
    tt = type_proto.tensor_type
    if tt.elem_type not in (TensorProto.INT64, TensorProto.INT32):
        return False
    dims = tt.shape.dim if tt.HasField("shape") else None
    return dims is not None and (len(dims) == 1 or (len(dims) == 2 and dims[1].dim_value == 1))


@dataclass(frozen=True)
class _Output:
    name: str
    description: str
    scores: bool
    zipmap: Any = None  # the ZipMap node that produces it
    labels: bool = False  # class ids, one per row: served as one-hot scores


def _outputs(model: Any) -> list[_Output]:
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for o in model.graph.output:
        node = producers.get(o.name)
        if node is not None and node.op_type == "ZipMap" and node.domain == ML_DOMAIN:
            out.append(_Output(o.name, f"ZipMap of {node.input[0]!r}: a sequence of maps", True, node))
        else:
            out.append(_Output(o.name, _describe(o.type), _is_scores(o.type), labels=_is_labels(o.type)))
    return out


def _a(text: str) -> str:
    return ("an " if text[:1] in "aeiou" else "a ") + text


def _listing(outputs: Iterable[_Output]) -> str:
    return ", ".join(f"{o.name} ({o.description})" for o in outputs)


def _choose(path: Path, outputs: list[_Output], wanted: str | None) -> _Output:
    if wanted is not None:
        match = [o for o in outputs if o.name == wanted or (o.zipmap is not None and o.zipmap.input[0] == wanted)]
        if not match:
            raise ModelError(f"{path} has no output {wanted!r}; its outputs are: {_listing(outputs)}")
        chosen = match[0]
    else:
        scores = [o for o in outputs if o.scores] or [o for o in outputs if o.labels]  # label-only: served as labels
        if not scores:
            raise ModelError(f"{path} has no output of per-class scores (a float tensor shaped (batch, classes)); "
                             f"its outputs are: {_listing(outputs)}")
        named = [o for o in scores if any(w in o.name.lower() for w in _SCORE_WORDS)]
        chosen = (named or scores)[0]
    if chosen.zipmap is None and not chosen.scores and not chosen.labels:
        if "map" in chosen.description:
            raise ModelError(f"{path}: output {chosen.name!r} is {_a(chosen.description)}, not a tensor, and no "
                             f"ZipMap node produces it to undo; {_ZIPMAP_FIX}")
        others = [o.name for o in outputs if o.scores and o is not chosen]
        raise ModelError(f"{path}: output {chosen.name!r} is {_a(chosen.description)}, not per-class scores (a float "
                         "tensor shaped (batch, classes)), which the build evaluates and devices serve"
                         + (f"; choose {', '.join(others)} with --output" if others else ""))
    return chosen


def _subgraph_inputs(node: Any) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read, which may come from the outer graph."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


def _prune(graph: Any, keep: str) -> None:
    """Keep only the nodes, initializers and value infos that ``keep`` depends on."""
    needed = {keep}
    nodes = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    kept_nodes = list(reversed(nodes))
    del graph.node[:]
    graph.node.extend(kept_nodes)
    produced = {o for n in kept_nodes for o in n.output}
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _check_input(path: Path, model: Any, row_shape: tuple[int, ...] | None) -> None:
    """One float32 input with a dynamic batch dimension, whose other dimensions rows of ``row_shape`` fill."""
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); a "
                         "device feeds one float32 tensor shaped (batch, features...): export the model with one "
                         "input")
    name, t = inputs[0].name, inputs[0].type
    if t.WhichOneof("value") != "tensor_type" or t.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"{path}: input {name!r} is {_a(_describe(t))}; a device feeds float32: export "
                         "the model with a float32 input (skl2onnx: to_onnx(model, X.astype(numpy.float32)))")
    if not t.tensor_type.HasField("shape"):  # rank unknown: ONNX Runtime checks the rows when it runs them
        return
    dims = [d.dim_value or None for d in t.tensor_type.shape.dim]
    if not dims or dims[0] is not None:
        rows = dims[1:] if len(dims) > 1 else dims  # (4,): one row of 4 values and no batch dimension
        what = (f"a fixed batch size of {dims[0]}" if len(dims) > 1 else "no batch dimension")
        dynamic = "[None, " + ", ".join(str(d or "None") for d in rows or ["n_features"]) + "]"
        raise ModelError(f"{path}: input {name!r} is {_a(_describe(t))}: it has {what}, and the build evaluates "
                         "batches of rows, as devices serve them; export the model with a dynamic batch dimension "
                         f"(onnxmltools: initial_types=[({name!r}, FloatTensorType({dynamic}))]; skl2onnx: "
                         "to_onnx(model, X[:1]); torch.onnx.export: dynamic_shapes)")
    if row_shape is None:
        return
    if len(dims) != len(row_shape) + 1 or any(d not in (None, r) for d, r in zip(dims[1:], row_shape, strict=True)):
        values = math.prod(row_shape)
        shown = f"({', '.join(map(str, row_shape))}{',' if len(row_shape) == 1 else ''})"
        raise ModelError(f"{path}: input {name!r} is {_a(_describe(t))}, and the dataset's rows are shaped "
                         f"{shown} ({values} value{'s' if values != 1 else ''} each): the data cannot fill it; "
                         "build with the dataset the model was trained on (the same feature columns, in order), or "
                         "export the model for rows shaped like the dataset's")


def _features_read(model: Any, name: str) -> tuple[int, bool, str] | None:
    """How many values per row the ``ai.onnx.ml`` operator reading input ``name`` (through Identity or Cast) uses,
    whether that count is exact (a linear model's weights) or a least one (the highest feature a tree tests), and
    the operator; None when no such operator reads it."""
    names, found = {name}, None
    for node in model.graph.node:  # topologically sorted: a chain from the input is followed in one pass
        if not names.intersection(node.input):
            continue
        if node.op_type in ("Identity", "Cast") and node.domain in ("", "ai.onnx"):
            names.update(node.output)
            continue
        if node.domain != ML_DOMAIN:
            continue
        attrs = {a.name: a for a in node.attribute}
        count: tuple[int, bool] | None = None
        if node.op_type in ("LinearClassifier", "LinearRegressor") and "coefficients" in attrs:
            columns = len(attrs["intercepts"].floats) if node.op_type == "LinearClassifier" and "intercepts" in attrs \
                else (attrs["targets"].i if "targets" in attrs else 1)
            count = (len(attrs["coefficients"].floats) // columns, True) if columns else None
        elif node.op_type == "Scaler" and "scale" in attrs and len(attrs["scale"].floats) > 1:
            count = (len(attrs["scale"].floats), True)
        elif node.op_type.startswith("TreeEnsemble") and attrs.get("nodes_featureids") is not None:
            ids = attrs["nodes_featureids"].ints
            count = (max(ids) + 1, False) if ids else None
        if count is not None and (found is None or (count[1] and not found[1]) or
                                  (count[1] == found[1] and count[0] > found[0])):
            found = (count[0], count[1], node.op_type)  # an exact count over a least one; the largest
    return found


def _check_features(path: Path, model: Any, row_shape: tuple[int, ...] | None) -> None:
    """The feature count the model's ``ai.onnx.ml`` operator reads, against the input's declaration and the rows.

    A declaration of ``(batch, ?)`` fits any rows, while a LinearClassifier's weights read a set number of
    values: the prepared model declares that number, so that rows of another width are refused, not misread.
    """
    graph_input = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    tt = graph_input.type.tensor_type
    if not tt.HasField("shape") or len(tt.shape.dim) != 2:
        return
    read = _features_read(model, graph_input.name)
    if read is None:
        return
    count, exact, op = read
    declared = tt.shape.dim[1].dim_value or None
    reads = f"its {op} reads {'' if exact else 'at least '}{count} value{'s' if count != 1 else ''} per row"
    if declared is not None and (declared != count if exact else declared < count):
        raise ModelError(f"{path}: input {graph_input.name!r} is declared {_describe(graph_input.type)}, and {reads}; "
                         "the export is inconsistent: export it again from the trained model")
    if row_shape is not None and (len(row_shape) != 1 or (row_shape[0] != count if exact else row_shape[0] < count)):
        raise ModelError(f"{path}: {reads} (input {graph_input.name!r}), and the dataset's rows are shaped "
                         f"({', '.join(map(str, row_shape))},): the data cannot fill it; build with the dataset the "
                         "model was trained on (the same feature columns, in order)")
    if declared is None and exact:
        tt.shape.dim[1].dim_value = count


def _checker_problem(model: Any) -> str | None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


def _class_ids(model: Any) -> list[int] | None:
    """The class ids a classifier operator of the model labels its rows with (``classlabels_ints``), if it says."""
    for node in model.graph.node:
        for a in node.attribute:
            if a.name in ("classlabels_ints", "classlabels_int64s") and a.ints:
                return [int(v) for v in a.ints]
    return None


def _one_hot(path: Path, model: Any, label: str, classes: int | None) -> tuple[str, list[str]]:
    """Append nodes that turn the class-id output ``label`` into one-hot float scores (batch, classes): 1 for the
    predicted class. Returns the new output's name and the class of each column (the ids, as text, for the build
    to hold against the dataset's class names)."""
    from onnx import TensorProto, helper

    if not classes:
        raise ModelError(f"{path}: output {label!r} gives class ids, which serve a classifier; this dataset has no "
                         "classes (a regression target?)")
    ids = _class_ids(model)
    if ids is None:  # nothing bounds the ids: one out of range would become an all-zero row, scored as class 0
        raise ModelError(f"{path}: output {label!r} gives class ids, and no classifier operator of the model says "
                         "which (classlabels_ints); export the per-class scores and choose them with --output")
    if ids != list(range(classes)):
        raise ModelError(f"{path}: output {label!r} labels rows with the classes {ids[:20]}, and the dataset's "
                         f"classes are the ids 0…{classes - 1}: train on labels 0…{classes - 1} (in the dataset's "
                         "order), or export the per-class scores and choose them with --output")
    g = model.graph
    flat, ids64, out = f"{label}_flat", f"{label}_int64", f"{label}_one_hot"
    g.initializer.extend([
        helper.make_tensor(f"{label}_shape", TensorProto.INT64, [1], [-1]),
        helper.make_tensor(f"{label}_depth", TensorProto.INT64, [1], [classes]),
        helper.make_tensor(f"{label}_values", TensorProto.FLOAT, [2], [0.0, 1.0]),
    ])
    g.node.extend([
        helper.make_node("Reshape", [label, f"{label}_shape"], [flat]),
        helper.make_node("Cast", [flat], [ids64], to=TensorProto.INT64),
        helper.make_node("OneHot", [ids64, f"{label}_depth", f"{label}_values"], [out], axis=-1),
    ])
    return out, [str(i) for i in ids]


def prepare_onnx(src: Path, dst: Path, output: str | None = None, *,
                 row_shape: tuple[int, ...] | None = None, classes: int | None = None) -> PreparedOnnx:
    """Write to ``dst`` a copy of ``src`` whose one output is ``output`` (or the scores output), ZipMap undone;
    an output of class ids (a label-only model, or ``--output`` naming the label) becomes one-hot scores.

    ``row_shape``: the shape of one row of the dataset the build runs it on (checked against the model's input);
    ``classes``: how many classes the dataset has (needed to serve class ids).
    """
    import onnx
    from onnx import TensorProto, helper

    model = load_onnx(src)
    _check_input(src, model, row_shape)
    _check_features(src, model, row_shape)
    source_checks = _checker_problem(model) is None
    outputs = _outputs(model)
    chosen = _choose(src, outputs, output)
    graph = model.graph
    if chosen.zipmap is not None:
        node = chosen.zipmap
        tensor = node.input[0]
        labels = next((a for a in node.attribute if a.name in ("classlabels_int64s", "classlabels_strings")), None)
        class_labels = ([str(v) for v in labels.ints] + [v.decode("utf-8", "replace") for v in labels.strings]
                        if labels is not None else None)
        classes = len(class_labels or [])
        known = {v.name: v for v in [*graph.value_info, *graph.output]}
        new_output = onnx.ValueInfoProto()
        if tensor in known and known[tensor].type.WhichOneof("value") == "tensor_type":
            new_output.CopyFrom(known[tensor])
        else:  # ZipMap's input is a float tensor (batch, classes) by the operator's definition
            new_output.CopyFrom(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [None, classes or None]))
        name = tensor
    elif chosen.labels:
        name, class_labels = _one_hot(src, model, chosen.name, classes)
        new_output = helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, classes])
    else:
        new_output = next(o for o in graph.output if o.name == chosen.name)
        name, class_labels = chosen.name, None
    if len(name) > _MAX_NAME:
        raise ModelError(f"{src}: the output name {name[:40]!r}… is longer than {_MAX_NAME} characters, the most a "
                         "manifest holds; rename it in the export")
    kept = onnx.ValueInfoProto()
    kept.CopyFrom(new_output)
    del graph.output[:]
    graph.output.append(kept)
    _prune(graph, name)
    domains = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    operators = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")})
    used = {n.domain or "" for n in graph.node}
    opsets = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    problem = _checker_problem(model) if source_checks else None  # a source that fails it: ONNX Runtime decides
    if problem:
        raise ModelError(f"{src}: the model with output {name!r} alone does not pass the ONNX checker: {problem}")
    dst.write_bytes(model.SerializeToString())
    return PreparedOnnx(output=name, source_output=chosen.name, zipmap=chosen.zipmap is not None,
                        labels=chosen.labels,
                        dropped=[o.name for o in outputs if o.name != chosen.name], domains=domains,
                        operators=operators, class_labels=class_labels)
