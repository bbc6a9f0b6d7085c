"""The router losses and routing statistics of a MoLoRA model, as a mixin of :class:`molora.model.MoLoRAModel`.

The mixin reads what the model sets: ``molora_layers()``, ``molora_config``, ``routing_context``
(the task ids of the forward), ``_token_mask`` (the forward's attention mask) and ``_stats``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from molora.core.losses import load_balancing_loss, router_z_loss
from molora.routing_report import accumulate, format_routing, plot_routing, routing_report

__all__ = ["RoutingStatsMixin"]


class RoutingStatsMixin:
    """``aux_loss``, ``z_loss``, ``routing_stats``, ``routing_report``, ``print_routing`` (DESIGN §5)."""

    # ------------------------------------------------------------------ losses
    def _layer_mask(self, num_tokens: int) -> torch.Tensor | None:
        """(T,) non-padding mask aligned with a layer's T tokens, when it can be aligned."""
        mask = self._token_mask
        if mask is None or mask.dim() != 2:
            return None
        batch = mask.shape[0]
        if num_tokens % batch or mask.shape[1] < num_tokens // batch:
            return None
        return mask[:, -(num_tokens // batch) :].reshape(-1)

    def _routings(self):
        """(name, last routing) of each router: a block's shared router (router_sharing="block")
        counts once, under its first layer, in the losses and the statistics."""
        for name, layer in self.molora_layers().items():
            if layer.last_routing is not None and layer.owns_router:
                yield name, layer.last_routing

    def aux_loss(self) -> torch.Tensor:
        """Mean over MoLoRA layers of the load-balancing loss of the last forward (DESIGN §5)."""
        losses = [load_balancing_loss(r.logits, r.indices, self._layer_mask(r.num_tokens)) for _, r in self._routings()]
        if not losses:
            raise RuntimeError("aux_loss() needs a forward pass first")
        return torch.stack(losses).mean()

    def z_loss(self) -> torch.Tensor:
        """Mean over MoLoRA layers of the router z-loss of the last forward (DESIGN §5)."""
        losses = [router_z_loss(r.logits, self._layer_mask(r.num_tokens)) for _, r in self._routings()]
        if not losses:
            raise RuntimeError("z_loss() needs a forward pass first")
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ statistics
    def reset_routing_stats(self) -> None:
        self._stats: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def _update_routing_stats(self, stats: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Accumulate each layer's load, gates and gate entropy on the device (masks multiply: no sync)."""
        cfg = self.molora_config
        num_tasks = cfg.num_tasks or (len(cfg.task_names) if cfg.task_names else None)
        stats = self._stats if stats is None else stats
        for name, r in self._routings():
            probs = torch.softmax(r.logits.float(), dim=-1)  # (T, N)
            mask = self._layer_mask(r.num_tokens)
            accumulate(stats.setdefault(name, {}), r.weights, mask, self.routing_context.task_ids, num_tasks, probs)

    def last_routing_report(self) -> dict[str, Any]:
        """:meth:`routing_report` of the latest forward only (each layer's ``last_routing``),
        whatever ``track_routing_stats`` says: what a training loop reads at log time, with no
        cost in the forward."""
        stats: dict[str, dict[str, torch.Tensor]] = {}
        self._update_routing_stats(stats)
        return routing_report(stats, self.molora_config.task_names)

    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer expert load over the forwards since the last ``reset_routing_stats()``.

        Returns:
            {layer name: {"load": (N,) fraction of real tokens routed to each expert (sums
            to k), "gates": (N,) mean gate weight per expert (sums to 1), "tokens": count,
            "experts_per_token": mean number of experts per real token (k; varies with top-p),
            "entropy", "max_gate": mean normalized entropy and mean largest value of the
            router's probabilities (1 and 1/N for uniform routing)}}.
        """
        out = {}
        for name, s in self._stats.items():
            tokens = s["tokens"].clamp(min=1)
            out[name] = {
                "load": (s["load"] / tokens).cpu(),
                "gates": (s["gates"] / tokens).cpu(),
                "tokens": int(s["tokens"]),
                "experts_per_token": float(s["load"].sum() / tokens),
                "entropy": float(s["entropy"] / tokens),
                "max_gate": float(s["max_gate"] / tokens),
            }
        return out

    def routing_report(self) -> dict[str, Any]:
        """Per-layer expert load, pooled and per task, since the last ``reset_routing_stats()``.

        Returns:
            ``{layer: {"all": {"load", "gates", "tokens"}, "tasks": {task name: {...}}}}``
            (see :func:`molora.routing_report.routing_report`); per-task rows need
            ``task_ids`` in the forwards and ``config.num_tasks`` or ``config.task_names``.
        """
        return routing_report(self._stats, self.molora_config.task_names)

    def print_routing(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Print the per-layer, per-task load table; with ``path``, also write it as a PNG
        heat map when matplotlib is installed (a note is printed when it is not). Returns the report."""
        report = self.routing_report()
        print(format_routing(report))
        if path is not None and report:
            try:
                print(f"wrote {plot_routing(report, path)}")
            except ImportError:
                print(f"{path} not written: matplotlib is not installed (pip install matplotlib)")
        return report
