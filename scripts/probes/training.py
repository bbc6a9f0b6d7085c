"""Probe cases for training: resume with changed settings, divergence, damaged training state,
hostile adapter files, bad base models (issue 17, items 5-10, 13-15, 18-20, 23).

Register cases with the helpers of :mod:`probes` (see its docstring), for example:

    from probes import api_error, case, cli_error

    cli_error("train: lr=1e9 diverges", lambda tmp: ["train", TINY, f"train.output_dir={tmp}", "train.lr=1e9"],
              area="training")

    @case("training", "resume with a raised max_steps")
    def _resume(tmp):
        ...
        return ok, "what the user sees"

Each case gets its own empty temporary folder; shared builders live in :mod:`probes.common`.
"""

from __future__ import annotations
