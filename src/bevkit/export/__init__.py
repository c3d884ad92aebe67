"""Export of trained models: one ONNX graph of standard operators, checked in onnxruntime."""

from .onnx import (
    ExportGraph,
    compare_detections,
    example_batch,
    export_onnx,
    flatten_outputs,
    graph_args,
    graph_inputs,
    load_trained,
    nest,
    parity,
)

__all__ = ["ExportGraph", "compare_detections", "example_batch", "export_onnx", "flatten_outputs", "graph_args",
           "graph_inputs", "load_trained", "nest", "parity"]
