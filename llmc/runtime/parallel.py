"""Loading a package for the CLI, the server and the offline API: bucketed shapes, and the
distributed launch of tensor/pipeline-parallel packages (one worker process per rank)."""

from pathlib import Path

from .bucketing import bucketed
from .engine import EngineConfig, LLMEngine
from .package import PackageError, read_plan


def load_engine(package_dir, device=None, config: EngineConfig | None = None, tp=None, pp=None) -> LLMEngine:
    """The package's engine; a tp/pp package starts its worker ranks first (``--tp``/``--pp`` must
    match what it was compiled for)."""
    package_dir = Path(package_dir)
    plan = read_plan(package_dir)
    parallel = plan.get("parallel") or {"tp": 1, "pp": 1}
    for flag, asked in (("tp", tp), ("pp", pp)):
        if asked is not None and asked != parallel[flag]:
            raise PackageError(f"--{flag} {asked}: {package_dir} was compiled for {flag}={parallel[flag]}; "
                               f"compile it again with --set shard.{flag}={asked}")
    if parallel["tp"] * parallel["pp"] > 1:
        from .launcher import start_distributed_engine
        engine = start_distributed_engine(package_dir, plan, device=device, config=config)
    else:
        engine = LLMEngine.from_package(package_dir, device=device, config=config)
    engine.forward = bucketed(engine.forward, plan)
    return engine
