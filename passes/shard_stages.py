"""Pipeline stages for the shard pass (not a pass): partition layers by cost, cut the graph at the stage
boundaries with pp_send / pp_recv."""

from __future__ import annotations

from llmc.errors import PipelineError
from llmc.ir import Graph


def pipeline_stages(graph: Graph, pp: int) -> tuple[list[Graph], list[list[int]]]:
    raise PipelineError(f"shard: pp={pp} is not implemented yet in this build; use shard.tp")
