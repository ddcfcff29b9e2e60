"""The main graph of an ONNX model, indexed for graph passes that fold constants.

``Graph`` answers what a pass asks before it rewrites: who produces and who
uses a value (counting uses from inside subgraphs and graph outputs), and
what constant a name holds, looking through ``Identity`` to an initializer or
a ``Constant`` node. It also makes the edits: give a node a new constant input
(overwriting a weight only when nothing else reads it, cloning it otherwise),
rename outputs, drop nodes. ``finish()`` then deletes dropped nodes and every
constant left unused, keeping IR < 4 graph inputs in step with initializers.
"""
import collections

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")

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
        has_matmul = any(node.op_type == "MatMul" for node in g.node)
        self._ranks = infer_ranks(model) if has_matmul else {}
        self.dropped = {}              # id -> node to delete in finish(); holding the
                                       # node keeps its id (and protobuf wrapper) stable
        self.maybe_unused = set()      # constants that edits may have orphaned
        self._arrays = {}

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

    def rank(self, name):
        """The rank of value `name` from the model's shape information, or None.
        (Computed when the Graph is built, for models with MatMul nodes.)"""
        return self._ranks.get(name)

    def constant(self, name):
        """The numpy value of `name` if it is constant; raises NotConstant saying why."""
        if name in self._arrays:
            return self._arrays[name]
        value = self._resolve(name, depth=0)
        self._arrays[name] = value
        return value

    def _resolve(self, name, depth):
        if depth > 64:
            raise NotConstant(f"'{name}' is reached through too many Identity nodes")
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
            return self._resolve(node.input[0], depth + 1)
        if in_default_domain(node) and node.op_type == "Constant":
            return constant_node_value(node)
        raise NotConstant(f"'{name}' is computed by {node.op_type} node '{node.name}'")

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
        for i, info in enumerate(self.proto.value_info):
            if info.name == name:
                del self.proto.value_info[i]
                break

    def finish(self):
        """Delete dropped nodes, then constants nobody reads any more."""
        pending = list(self.maybe_unused)
        while pending:
            name = pending.pop()
            if self.uses(name):
                continue
            node = self.producer.get(name)
            if (node is not None and id(node) not in self.dropped and in_default_domain(node)
                    and node.op_type in ("Constant", "Identity")
                    and not any(self.uses(out) for out in node.output if out)):
                self.drop(node)
                pending.extend(n for n in node.input if n)
            elif name in self.initializers and not self.is_overridable(name):
                self._delete_initializer(name)
        g = self.proto
        for i in reversed(range(len(g.node))):
            if id(g.node[i]) in self.dropped:
                del g.node[i]
        self.dropped.clear()
        self.maybe_unused.clear()

    def _delete_initializer(self, name):
        g = self.proto
        for i, tensor in enumerate(g.initializer):
            if tensor.name == name:
                del g.initializer[i]
                break
        del self.initializers[name]
        self._arrays.pop(name, None)
        if name in self.inputs:   # IR < 4 lists it as an input too
            for i, info in enumerate(g.input):
                if info.name == name:
                    del g.input[i]
                    break
            self.inputs.discard(name)
        self.forget_value_info(name)


def tensor_value(tensor):
    """A TensorProto as numpy; NotConstant when its data cannot be read."""
    try:
        return numpy_helper.to_array(tensor)
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


def infer_ranks(model, inline_limit=1 << 16):
    """Ranks of the values of the main graph, from ONNX shape inference.

    Inference runs on a copy in which large initializers are declared as graph
    inputs instead of carried, so it costs little memory and works past 2 GB.
    Returns {} if inference fails: an unknown rank only means a fold is skipped.
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
    ranks = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    for tensor in g.initializer:
        ranks[tensor.name] = len(tensor.dims)
    return ranks
