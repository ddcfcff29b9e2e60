"""The main graph of an ONNX model, indexed for graph passes that fold constants.

``Graph`` answers what a pass asks before it rewrites: who produces and who
uses a value (counting uses from inside subgraphs and graph outputs), and
what constant a name holds, looking through ``Identity`` to an initializer or
a ``Constant`` node, or evaluating the constant subgraph that computes it (a
few shape and arithmetic operators, ``CONSTANT_OPS``, run one node at a time
by ``onnx.reference.ReferenceEvaluator``, each result capped at
``CONSTANT_LIMIT`` elements; never anything that depends on a graph input).
It also makes the edits: give a node a new constant input (overwriting a
weight only when nothing else reads it, cloning it otherwise), rename
outputs, drop nodes. ``finish()`` then deletes dropped nodes and every
constant left unused (with the subgraph that computed it), keeping IR < 4
graph inputs in step with initializers. Every edit is O(1) or O(node size),
and ``finish()`` is one pass over the graph, so folding is linear in the model.
"""
import collections

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")

# Operators whose output is evaluated when every input is constant, and the
# largest result (in elements) that evaluation may produce.
CONSTANT_OPS = frozenset({
    "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Concat",
    "ConstantOfShape", "Mul", "Add", "Sub", "Div", "Sqrt", "Pow", "Neg", "Reciprocal",
    "Abs", "Exp", "Log"})
CONSTANT_LIMIT = 1 << 26

# Constant node attributes that hold a numeric value, and the numpy dtype of the
# scalar and list forms (the ONNX spec makes them float32 and int64).
_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def in_default_domain(node):
    return node.domain in DEFAULT_DOMAINS


def attribute(node, name, default=None):
    """The value of a node attribute, or `default` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_attribute(node, name, value):
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def default_opset(model):
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    return None


def subgraphs(node):
    """Graphs held by a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def names_read_in(graph):
    """Every name read by a node of `graph` or of its nested subgraphs. Names a
    subgraph defines itself are included too: over-counting uses is safe."""
    for node in graph.node:
        yield from (name for name in node.input if name)
        for sub in subgraphs(node):
            yield from names_read_in(sub)
    for out in graph.output:   # a subgraph may return an outer value directly
        yield out.name


def graph_tensors(graph):
    """Every TensorProto of `graph`: initializers and node attributes (Constant
    values, ...), in nested subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
        for sub in subgraphs(node):
            yield from graph_tensors(sub)


def model_tensors(model):
    """Every TensorProto of `model`: its graph's (``graph_tensors``) and its functions'."""
    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def all_names(graph):
    """Every value name in `graph` and its subgraphs (for choosing fresh names)."""
    names = set()
    for coll in (graph.input, graph.output, graph.value_info):
        names.update(v.name for v in coll)
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            names |= all_names(sub)
    return names


class NotConstant(Exception):
    """A name does not hold a constant; the message says why."""


class Graph:
    """A model's main graph with producer and use indexes, kept current by the edits."""

    def __init__(self, model):
        self.model = model
        self.proto = model.graph
        self.ir_version = model.ir_version
        self.opset = default_opset(model)
        g = self.proto
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = {v.name for v in g.input}
        self.outputs = collections.Counter(v.name for v in g.output)
        self.producer = {}
        self.readers = collections.defaultdict(list)      # name -> nodes reading it
        self.subgraph_reads = collections.Counter()        # name -> reads from subgraphs
        for node in g.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers[name].append(node)
            for sub in subgraphs(node):
                self.subgraph_reads.update(names_read_in(sub))
        self.names = all_names(g)
        # shapes are inferred once, before any edit, where a pass needs them
        needs_shapes = any(node.op_type in ("MatMul", "Squeeze", "Unsqueeze", "Reshape",
                                            "Flatten") for node in g.node)
        self._shapes = infer_shapes(model) if needs_shapes else {}
        self.dropped = {}              # id -> node to delete in finish(); holding the
                                       # node keeps its id (and protobuf wrapper) stable
        self.maybe_unused = set()      # constants that edits may have orphaned
        self._arrays = {}
        self._not_constant = {}        # name -> NotConstant, so a failure is found once
        self._computed = set()         # ids of nodes evaluated as constants
        self._stale_info = set()       # value_info names to delete in finish()

    # ---- questions ------------------------------------------------------

    def uses(self, name):
        """How many places read `name`: node inputs, subgraphs and graph outputs."""
        return len(self.readers.get(name, ())) + self.subgraph_reads[name] + self.outputs[name]

    def only_reader(self, name):
        """The single node reading `name` when nothing else does, else None."""
        readers = self.readers.get(name, ())
        if self.uses(name) == 1 and len(readers) == 1:
            return readers[0]
        return None

    def is_overridable(self, name):
        """An initializer that is also a graph input is a default a caller may
        replace at run time (IR >= 4). IR < 4 lists every initializer as an input,
        so there they are the model's weights."""
        return name in self.initializers and name in self.inputs and self.ir_version >= 4

    def shape(self, name):
        """The shape of value `name` from shape inference: a tuple of ints, dim_param
        strings and None (unknown), or None when even the rank is unknown. (Inferred
        when the Graph is built, for models with MatMul or reshaping nodes.)"""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return self._shapes.get(name)

    def rank(self, name):
        """The rank of value `name`, or None."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def constant(self, name):
        """The numpy value of `name` if it is constant; raises NotConstant saying why."""
        return self._value(name, depth=0)

    def is_constant(self, name):
        try:
            self._value(name, depth=0)
        except NotConstant:
            return False
        return True

    def _value(self, name, depth):
        if name in self._arrays:
            return self._arrays[name]
        if name in self._not_constant:
            raise self._not_constant[name]
        try:
            value = self._resolve(name, depth)
        except NotConstant as err:
            self._not_constant[name] = err
            raise
        self._arrays[name] = value
        return value

    def _resolve(self, name, depth):
        if depth > 64:
            raise NotConstant(f"'{name}' is computed through a chain of over 64 nodes")
        if name in self.initializers:
            if self.is_overridable(name):
                raise NotConstant(f"'{name}' is a graph input with a default value, which a "
                                  f"caller may override")
            return tensor_value(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            where = "a graph input" if name in self.inputs else "not defined in the graph"
            raise NotConstant(f"'{name}' is {where}")
        if in_default_domain(node) and node.op_type == "Identity":
            return self._value(node.input[0], depth + 1)
        if in_default_domain(node) and node.op_type == "Constant":
            return constant_node_value(node)
        if in_default_domain(node) and node.op_type in CONSTANT_OPS and not any(
                True for _ in subgraphs(node)):
            return self._evaluate(node, name, depth)
        raise NotConstant(f"'{name}' is computed by {node.op_type} node '{node.name}'")

    def _evaluate(self, node, name, depth):
        """Run one node whose inputs are all constant (onnx's reference evaluator)."""
        from onnx.reference import ReferenceEvaluator

        where = f"{node.op_type} node '{node.name}'" if node.name else f"a {node.op_type} node"
        inputs = {}
        for n in node.input:
            if n:
                try:
                    inputs[n] = self._value(n, depth + 1)
                except NotConstant as err:
                    # name the first step and the root cause, not every step between
                    root = getattr(err, "root", str(err))
                    failure = NotConstant(f"'{name}' is computed by {where} from '{n}', "
                                          f"which is not constant: {root}")
                    failure.root = root
                    raise failure from None
        size = sum(a.size for a in inputs.values())
        if node.op_type == "ConstantOfShape" and inputs:
            size = int(np.prod(next(iter(inputs.values())), dtype=np.float64))
        if size > CONSTANT_LIMIT:
            raise NotConstant(f"'{name}' is computed by {where} with {size} elements, above "
                              f"the {CONSTANT_LIMIT} bnfast evaluates")
        graph = onnx.helper.make_graph(
            [node], "constant",
            [onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for n, a in inputs.items()],
            [onnx.helper.make_empty_tensor_value_info(out) for out in node.output if out])
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", self.opset or 1)])
        model.ir_version = max(self.ir_version, 3)
        try:
            results = ReferenceEvaluator(model).run(None, inputs)
        except Exception as err:   # noqa: BLE001 - any failure: the value is not known
            raise NotConstant(f"'{name}' is computed by {where}, which could not be "
                              f"evaluated ({type(err).__name__}: {err})") from None
        self._computed.add(id(node))
        for out, value in zip((o for o in node.output if o), results):
            value = np.asarray(value)
            if value.size > CONSTANT_LIMIT:
                raise NotConstant(f"'{name}' is computed by {where} with {value.size} "
                                  f"elements, above the {CONSTANT_LIMIT} bnfast evaluates")
            self._arrays[out] = value
        return self._arrays[name]

    def source(self, name):
        """The chain of values a constant name is read through (for clean-up)."""
        chain = [name]
        node = self.producer.get(name)
        while node is not None and in_default_domain(node) and node.op_type == "Identity":
            chain.append(node.input[0])
            node = self.producer.get(node.input[0])
        return chain

    # ---- edits ----------------------------------------------------------

    def fresh_name(self, base):
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def set_constant_input(self, node, index, array, base_name):
        """Make input `index` of `node` read `array`.

        A plain initializer read only there, with the same shape and dtype, is
        overwritten under its own name (so IR < 4 graph inputs and any value_info
        stay true); otherwise the value goes into a new initializer and the old
        one is left to its other readers.
        """
        old = node.input[index] if index < len(node.input) else ""
        if (old and old in self.initializers and not self.is_overridable(old)
                and self.only_reader(old) is node and list(node.input).count(old) == 1
                and self.constant(old).shape == array.shape
                and self.constant(old).dtype == array.dtype):
            tensor = numpy_helper.from_array(array, old)
            self.initializers[old].CopyFrom(tensor)
            self._arrays.pop(old, None)
            return old
        name = self.fresh_name(base_name)
        tensor = numpy_helper.from_array(array, name)
        self.proto.initializer.append(tensor)
        self.initializers[name] = self.proto.initializer[-1]
        if self.ir_version < 4:   # IR < 4: every initializer is also a graph input
            self.proto.input.append(onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(array.shape)))
            self.inputs.add(name)
        while len(node.input) <= index:
            node.input.append("")
        if old:
            self._unread(old, node)
        node.input[index] = name
        self.readers[name].append(node)
        return name

    def set_input(self, node, index, name):
        old = node.input[index]
        self._unread(old, node)
        node.input[index] = name
        self.readers[name].append(node)

    def set_output(self, node, index, name):
        """Give `node` output `name` (the output it replaces must have no readers)."""
        old = node.output[index]
        self.producer.pop(old, None)
        node.output[index] = name
        self.producer[name] = node
        self.forget_value_info(old)

    def drop(self, node):
        """Remove `node`; its inputs may become unused constants."""
        self.dropped[id(node)] = node
        for name in node.input:
            if name:
                self._unread(name, node)
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]

    def _unread(self, name, node):
        readers = self.readers.get(name, [])
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                break
        self.maybe_unused.update(self.source(name))

    def forget_value_info(self, name):
        """The shape information of `name` goes (in finish())."""
        self._stale_info.add(name)

    def _is_constant_node(self, node):
        return in_default_domain(node) and (node.op_type in ("Constant", "Identity")
                                            or id(node) in self._computed)

    def finish(self):
        """Delete dropped nodes, then constants nobody reads any more (and the
        Constant, Identity and evaluated nodes that computed them)."""
        pending = list(self.maybe_unused)
        doomed = set()
        while pending:
            name = pending.pop()
            if self.uses(name) or name in doomed:
                continue
            node = self.producer.get(name)
            if (node is not None and id(node) not in self.dropped
                    and self._is_constant_node(node)
                    and not any(self.uses(out) for out in node.output if out)):
                self.drop(node)
                pending.extend(n for n in node.input if n)
            elif name in self.initializers and not self.is_overridable(name):
                doomed.add(name)
                del self.initializers[name]
                self._arrays.pop(name, None)
                self.inputs.discard(name)     # IR < 4 lists it as an input too
        g = self.proto
        _delete_where(g.node, lambda node: id(node) in self.dropped)
        _delete_where(g.initializer, lambda tensor: tensor.name in doomed)
        _delete_where(g.input, lambda info: info.name in doomed)
        stale = self._stale_info | doomed
        _delete_where(g.value_info, lambda info: info.name in stale)
        self.dropped.clear()
        self.maybe_unused.clear()
        self._stale_info.clear()


def _delete_where(repeated, doomed):
    """Delete the items of a protobuf repeated field for which `doomed` is true,
    in one pass (each deletion only moves pointers)."""
    for i in reversed([i for i, item in enumerate(repeated) if doomed(item)]):
        del repeated[i]


def tensor_value(tensor):
    """A TensorProto as numpy; NotConstant when its data cannot be read. External
    data must already be loaded (numpy_helper would read it relative to the
    working directory)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise NotConstant(f"tensor '{tensor.name}' keeps its data in an external file that "
                          f"is not loaded")
    try:
        return numpy_helper.to_array(tensor)
    except KeyError:      # a data type this onnx does not know (the checker may pass it)
        raise NotConstant(f"tensor '{tensor.name}' has data type {tensor.data_type}, which "
                          f"onnx {onnx.__version__} does not know") from None
    except (ValueError, TypeError, OSError) as err:
        raise NotConstant(f"tensor '{tensor.name}' cannot be read ({err})") from None


def constant_node_value(node):
    """The numeric value of a Constant node; NotConstant for strings and sparse values."""
    for attr in node.attribute:
        if attr.name == "value":
            return tensor_value(attr.t)
        if attr.name in _CONSTANT_LISTS:
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=_CONSTANT_LISTS[attr.name])
    kinds = ", ".join(a.name for a in node.attribute) or "no value"
    raise NotConstant(f"Constant node '{node.name}' holds {kinds}, not a numeric tensor")


def infer_shapes(model, inline_limit=1 << 16):
    """Shapes of the values of the main graph, from ONNX shape inference: tuples
    of ints, dim_param strings and None.

    Inference runs on a copy in which large initializers are declared as graph
    inputs instead of carried, so it costs little memory and works past 2 GB.
    Returns {} if inference fails: an unknown shape only means a fold is skipped.
    """
    g = model.graph
    skeleton = onnx.ModelProto()
    skeleton.ir_version = max(model.ir_version, 4)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    sk = skeleton.graph
    sk.node.extend(g.node)
    sk.input.extend(g.input)
    sk.output.extend(g.output)
    sk.value_info.extend(g.value_info)
    inputs = {v.name for v in g.input}
    for tensor in g.initializer:
        if tensor.ByteSize() <= inline_limit:
            sk.initializer.append(tensor)
        elif tensor.name not in inputs:
            sk.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:   # noqa: BLE001 - any failure just means "ranks unknown"
        return {}
    shapes = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor_type.shape.dim)
    return shapes
