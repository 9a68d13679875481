"""Built-in llmc passes (imported as ``llmc.passes``); one pass per file.

Importing this package registers every built-in pass in ``llmc.pipeline.PASSES``. The list is
explicit (no directory scan) so that what ships is what is reviewed.
"""

from llmc.passes import canonicalize  # noqa: F401
from llmc.passes import attention_lowering  # noqa: F401
from llmc.passes import select_logits  # noqa: F401
from llmc.passes import fuse  # noqa: F401
from llmc.passes import gqa_rewrite  # noqa: F401
from llmc.passes import prune  # noqa: F401
from llmc.passes import quantize_kv  # noqa: F401
from llmc.passes import quantize  # noqa: F401
from llmc.passes import shard  # noqa: F401
from llmc.passes import bucketing  # noqa: F401
from llmc.passes import memory_plan  # noqa: F401
