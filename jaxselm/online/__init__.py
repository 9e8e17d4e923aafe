"""The online SELM loop, its run config, its phases, and the CLI subcommands built on them.

    from jaxselm.config_io import load_config
    from jaxselm.online import RunConfig, run_online
    cfg = load_config(RunConfig, "configs/demo.yaml", ["online.iterations=1"])
    run_online(cfg)

Modules: ``config`` (the run config), ``context`` (what the phases share), ``rollout``
(sampling over a prompt set, multi-host), ``pairs`` (judged pairs as batches), ``phases``
(generate, judge, reference, train, SFT), ``evaluation``, ``loop`` (the orchestrator: the only
place that decides what to resume), ``commands`` (generate / eval / train-rm / convert),
``metrics`` (JSONL + TensorBoard + plot + table), ``prompts`` (prompt sets and tokenization).
"""

from jaxselm.online.config import RunConfig
from jaxselm.online.context import RunContext
from jaxselm.online.loop import Run, run_offline, run_online, run_sft

__all__ = ["Run", "RunConfig", "RunContext", "run_offline", "run_online", "run_sft"]
