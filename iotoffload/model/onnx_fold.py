"""Constant folding for exported ONNX graphs: evaluate every node whose inputs are all
constants (onnx's reference evaluator) and keep the result as an initializer.

PyTorch exports ZeroPad2d as a small subgraph computing the pads (ConstantOfShape, Slice with
step -1, ...); onnx2tf mis-converts it, while the folded graph has a plain Pad.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fold_constants(model: Any) -> Any:
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    consts: dict[str, np.ndarray[Any, Any]] = {
        i.name: numpy_helper.to_array(i) for i in g.initializer
    }
    graph_inputs = {i.name for i in g.input} - set(consts)
    kept = []
    for node in g.node:
        has_subgraph = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        )
        ins = [i for i in node.input if i]
        if not has_subgraph and all(i in consts for i in ins) and not (set(ins) & graph_inputs):
            try:
                ev = ReferenceEvaluator(node, opsets=opsets)
                outs = ev.run(None, {i: consts[i] for i in ins})
            except Exception:
                kept.append(node)
                continue
            for name, val in zip(node.output, outs, strict=False):
                consts[name] = np.asarray(val)
            continue
        kept.append(node)
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    new = onnx.ModelProto()
    new.CopyFrom(model)
    del new.graph.node[:]
    new.graph.node.extend(kept)
    del new.graph.initializer[:]
    new.graph.initializer.extend(
        numpy_helper.from_array(v, name=k) for k, v in consts.items() if k in used
    )
    keep_inputs = [i for i in g.input if i.name not in consts or i.name in used]
    del new.graph.input[:]
    new.graph.input.extend(i for i in keep_inputs if i.name not in consts)
    del new.graph.value_info[:]
    return new
