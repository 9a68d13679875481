"""Helpers of the ONNX tests: run an exported graph in onnxruntime next to the IR reference
interpreter, on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from llmc.ir.interpreter import ExecutionContext, Interpreter

PROMPT = [5, 17, 42, 9, 77, 3]
DECODE_STEPS = 8


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def decode_side_by_side(path: Path, graph, prompt=PROMPT, steps: int = DECODE_STEPS):
    """Prefill ``prompt`` then ``steps`` greedy decode steps, in onnxruntime (past/present KV fed
    back) and in the reference interpreter; the tokens follow the interpreter's argmax so both see the
    same inputs. Returns [(onnx logits, interpreter logits)] per step."""
    sess = session(path)
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    kv = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past}
    interp, ctx = Interpreter(graph), ExecutionContext.for_graph(graph)
    names = [o.name for o in sess.get_outputs()]
    ids, start, pairs = list(prompt), 0, []
    for _ in range(steps + 1):
        positions = np.arange(start, start + len(ids), dtype=np.int64)
        out = dict(zip(names, sess.run(None, {"input_ids": np.array(ids, np.int64), "positions": positions, **kv})))
        ref = interp.run({"input_ids": torch.tensor(ids), "positions": torch.from_numpy(positions)}, ctx)["logits"]
        pairs.append((out["logits"], ref.numpy()))
        kv = {i.name: out[i.name.replace("past_key_values.", "present.")] for i in past}
        start, ids = start + len(ids), [int(ref[-1].argmax())]
    return pairs


def max_diff(pairs) -> float:
    return max(float(np.abs(a - b).max()) for a, b in pairs)
